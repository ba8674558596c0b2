"""Controllable generation: guidance, noisy classifiers, targets and their bad inputs, the control commands."""

import json
import math
import sys
from dataclasses import replace

import pytest
import torch

from difflm.classifier import (POSITION_CLASSES, SPAN_CLASSES, NoisyClassifier, NoisyClassifierConfig,
                               classifier_loss, content_labels, load_classifier, model_fingerprint,
                               position_labels, span_labels)
from difflm.cli import main
from difflm.config import GuidanceConfig
from difflm.control import ControlContext, Target, TokenGuide, make_control, parse_target, success, token_constraints
from difflm.data import mr_values, parse_mr
from difflm.diffusion import GaussianDiffusion
from difflm.errors import DifflmError
from difflm.grammar import builtin_grammar
from difflm.guidance import Guidance
from difflm.sampling import StepState
from difflm.schedules import get_schedule
from difflm.text import SamplingModelFn, load_model, meaning_control, save_model

from conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- meanings ----------------------------------------------------------------------------------------------------
def test_parse_mr_reads_e2e_meaning_representations():
    mr = "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]"
    assert parse_mr(mr) == {"name": "The Vaults", "eatType": "pub", "priceRange": "more than £30",
                            "customer rating": "5 out of 5", "near": "Café Adriatic"}
    assert parse_mr("") == {} and parse_mr("food[]") == {}


def test_grammar_meanings_match_their_sentences():
    g = builtin_grammar()
    pairs = g.corpus_with_meanings(300, seed=5)
    assert [t for t, _ in pairs] == g.corpus(300, seed=5)  # recording meanings leaves the corpus unchanged
    for text, mr in pairs:
        meaning = parse_mr(mr)
        assert meaning["name"] and text.startswith(meaning["name"])
        assert all(v in text for v in meaning.values())
        assert ("food" in meaning) == (" food " in text)


# ---- guidance ----------------------------------------------------------------------------------------------------
class Pull:
    """log p(c | x) = -||x - centre||^2 / 2 per example."""

    def __init__(self, centre):
        self.centre = centre

    def log_prob(self, x, t):
        return -0.5 * ((x - self.centre) ** 2).flatten(1).sum(1)


def _state(x, mean, var, index=0, num_steps=10):
    b = x.shape[0]
    return StepState(index, num_steps, torch.full((b,), 0.5), torch.full((b,), 0.4), x, x, x.clone(), mean,
                     torch.full((b, 1, 1), var))


def test_guidance_moves_toward_the_objective_and_fluency_holds_it_back():
    d = GaussianDiffusion(get_schedule("sqrt"), 100)
    x = torch.zeros(3, 4, 2)
    centre = torch.ones(3, 4, 2)
    free = Guidance(d, [(Pull(centre), 1.0)], GuidanceConfig(steps=20, step_size=0.1, optimizer="sgd", fluency=0.0))
    moved = free(_state(x, x, 0.1))
    assert torch.all(moved > 0) and torch.all(moved < 1)
    held = Guidance(d, [(Pull(centre), 1.0)], GuidanceConfig(steps=20, step_size=0.01, optimizer="sgd", fluency=1.0))
    # gradient of -(x-1)^2/2 - (x-0)^2/0.1 vanishes at x = 1/21: the fluency term keeps x near the mean 0
    assert held(_state(x, x, 0.1)) == pytest.approx(torch.full_like(x, 1 / 21), abs=1e-3)


def test_adagrad_steps_are_bounded_and_guides_add_up():
    d = GaussianDiffusion(get_schedule("sqrt"), 100)
    x = torch.zeros(2, 3, 2)
    cfg = GuidanceConfig(steps=3, step_size=0.1, optimizer="adagrad", fluency=0.0)
    moved = Guidance(d, [(Pull(torch.full_like(x, 100.0)), 1.0)], cfg)(_state(x, x, 0.1))
    # Adagrad's steps are lr * g / sqrt(sum g^2): at most lr (1 + 1/sqrt(2) + 1/sqrt(3)) for a constant gradient
    assert torch.all(moved <= 0.1 * (1 + 1 / math.sqrt(2) + 1 / math.sqrt(3)) + 1e-6) and torch.all(moved > 0.1)
    a, b = Pull(torch.ones_like(x)), Pull(-3 * torch.ones_like(x))
    both = Guidance(d, [(a, 1.0), (b, 0.5)], cfg)
    t = torch.full((2,), 0.3)
    torch.testing.assert_close(both.objective(x, t), a.log_prob(x, t) + 0.5 * b.log_prob(x, t))


def test_last_steps_can_be_left_unguided():
    d = GaussianDiffusion(get_schedule("sqrt"), 100)
    x = torch.zeros(1, 2, 2)
    g = Guidance(d, [(Pull(torch.ones_like(x)), 1.0)], GuidanceConfig(unguided_last=2))
    assert torch.equal(g(_state(x, x, 0.1, index=8, num_steps=10)), x)
    assert not torch.equal(g(_state(x, x, 0.1, index=7, num_steps=10)), x)
    with pytest.raises(DifflmError, match="guidance.optimizer"):
        Guidance(d, [], GuidanceConfig(optimizer="adam"))


# ---- labels and classifiers --------------------------------------------------------------------------------------
def test_labels_of_each_task():
    mrs = ["name[Aromi], food[Italian]", "name[Aromi]", "name[Zizzi], food[French]", "name[Zizzi], food[Italian]"]
    fields = mr_values(mrs, min_count=1)
    assert fields == {"food": ["French", "Italian"], "name": ["Aromi", "Zizzi"]}
    assert content_labels(mrs, fields).tolist() == [[2, 1], [0, 1], [1, 2], [2, 2]]
    pos = position_labels([["PROPN", "VERB"]], 6)[0].tolist()
    assert [POSITION_CLASSES[i] for i in pos] == ["[START]", "PROPN", "VERB", "[END]", "[PAD]", "[PAD]"]
    spans = span_labels([{(0, 2, "NOUN")}], [3], 6)[0]
    assert SPAN_CLASSES[spans[1, 3]] == "NOUN" and spans[1, 2] == 0 and spans[2, 2] == -100 and spans[3, 1] == -100
    assert spans[0].eq(-100).all() and spans[4:].eq(-100).all()  # START, END and PAD rows are ignored


@pytest.mark.parametrize("task", ["content", "pos", "syntax"])
def test_classifier_outputs_and_loss(task):
    cfg = NoisyClassifierConfig(task=task, fields={"food": ["French", "Italian"], "name": ["A"]}, seq_len=6,
                                embed_dim=4, hidden_size=16, num_layers=1, num_heads=2)
    clf = NoisyClassifier(cfg)
    x, t = torch.randn(2, 6, 4), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        logp = clf.log_probs(x, t)
    if task == "content":
        assert logp.shape == (2, 5)
        torch.testing.assert_close(logp[:, :3].exp().sum(1), torch.ones(2))  # food: none, French, Italian
        torch.testing.assert_close(logp[:, 3:].exp().sum(1), torch.ones(2))  # name: none, A
        labels = torch.tensor([[1, 0], [2, 1]])
    elif task == "pos":
        assert logp.shape == (2, 6, len(POSITION_CLASSES))
        labels = position_labels([["NOUN"], ["NOUN", "VERB"]], 6)
    else:
        assert logp.shape == (2, 6, 6, len(SPAN_CLASSES))
        labels = span_labels([{(0, 1, "NOUN")}, set()], [2, 3], 6)
    loss, acc = classifier_loss(clf, x, t, labels)
    assert torch.isfinite(loss) and 0 <= acc <= 1
    loss.backward()
    assert all(p.grad is not None for p in clf.head.parameters())


def test_a_classifier_that_reads_x0_scores_the_models_estimate():
    """classifier.reads=x0: the guide scores x0_fn(x_t, t), its gradient taken through x0_fn; an x_t classifier
    ignores x0_fn."""
    from difflm.control import ClassifierGuide

    cfg = dict(task="pos", seq_len=6, embed_dim=4, hidden_size=16, num_layers=1, num_heads=2)
    x, t = torch.randn(2, 6, 4), torch.tensor([0.2, 0.7])
    index, mask = torch.tensor([[3, 30], [5, -1]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    x0_fn = lambda v, s: 2 * v.flip(1)  # noqa: E731  any differentiable estimate
    for reads, seen in (("x0", x0_fn(x, t)), ("x_t", x)):
        clf = NoisyClassifier(NoisyClassifierConfig(reads=reads, **cfg)).eval()
        got = ClassifierGuide(clf, index, mask, x0_fn)
        with torch.no_grad():
            want = (clf.log_probs(seen, t).flatten(1).gather(1, index.clamp(min=0)) * mask).sum(1)
        x_in = x.clone().requires_grad_(True)
        value = got.log_prob(x_in, t)
        torch.testing.assert_close(value.detach(), want)
        (grad,) = torch.autograd.grad(value.sum(), x_in)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_guides_share_one_x0_estimate_per_objective():
    """SharedEstimate: the guides of one objective evaluation (same x and t) run the denoiser once, and the gradient
    through the shared estimate is the sum of theirs; a new x runs it again."""
    from difflm.control import SharedEstimate

    calls = []

    def x0_fn(v, s):
        calls.append(1)
        return 3 * v

    shared = SharedEstimate(x0_fn)
    x, t = torch.randn(2, 3, 4, requires_grad=True), torch.tensor([0.1, 0.4])
    total = (shared(x, t) ** 2).sum() + shared(x, t).sum()
    (grad,) = torch.autograd.grad(total, x)
    assert len(calls) == 1
    torch.testing.assert_close(grad, 18 * x.detach() + 3)
    shared(x.detach().clone(), t)
    assert len(calls) == 2


# ---- targets and their bad inputs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tiny_run):
    model, tok = load_model(tiny_run / "model")
    clf = NoisyClassifier(NoisyClassifierConfig(task="content", fields={"food": ["French", "Italian"]},
                                                seq_len=24, embed_dim=8, hidden_size=16, num_layers=1, num_heads=2,
                                                diffusion_fingerprint=model_fingerprint(model)))
    return ControlContext(model, tok, GuidanceConfig(sampling_steps=5), {"content": clf})


def test_bad_targets_are_one_line_errors(ctx):
    bad = [("content", "colour=red", "unknown field 'colour'; valid fields: food"),
           ("content", "food=Thai", "unknown value 'Thai' for food; valid values: French, Italian"),
           ("content", "food", "must look like field=value"),
           ("length", "23", "target length 23 does not fit"),
           ("length", "ten", "whole number"),
           ("infill", "Aromi is a pub .", "no free position"),
           ("infill", "Aromi is _ zeppelin", "'zeppelin' is not in the model's vocabulary"),
           ("pos", "NOUN VRB", "unknown tag 'VRB'; the tag set is ADJ"),
           ("syntax", "3-1:NOUN", "0 <= i < j"),
           ("syntax", "0-2", "must look like i-j:TAG"),
           ("dance", "x", "unknown task 'dance'")]
    for task, spec, message in bad:
        with pytest.raises(DifflmError, match=message.replace("(", r"\(")):
            parse_target(task, spec, ctx)
    assert parse_target("length", "22", ctx).value == 22
    with pytest.raises(DifflmError, match="train-classifier --model MODEL --task pos"):
        ctx.classifier("pos")


def test_token_constraints_fix_start_end_pad_and_words(ctx):
    start, end, pad = ctx.tokenizer.convert_tokens_to_ids(["[START]", "[END]", "[PAD]"])
    fixed, allowed, constrained = token_constraints(parse_target("length", "3", ctx), ctx)
    assert fixed[:6].tolist() == [start, -1, -1, -1, end, pad] and (fixed[5:] == pad).all()
    assert not allowed[1, [start, end, pad]].any() and allowed[1].sum() == ctx.model.config.vocab_size - 3
    assert allowed[4].sum() == 1 and allowed[4, end] and constrained.all()
    fixed, _, _ = token_constraints(parse_target("infill", "Aromi is _ pub", ctx), ctx)
    aromi, is_, pub = ctx.tokenizer.convert_tokens_to_ids(["Aromi", "is", "pub"])
    assert fixed[:6].tolist() == [start, aromi, is_, -1, pub, end]


def test_pos_and_syntax_targets_imply_their_length(ctx):
    start, end, pad = ctx.tokenizer.convert_tokens_to_ids(["[START]", "[END]", "[PAD]"])
    pos = parse_target("pos", "PROPN AUX NOUN", ctx)
    for a, b in zip(token_constraints(pos, ctx), token_constraints(parse_target("length", "3", ctx), ctx)):
        assert torch.equal(a, b)  # a tag per word: exactly that many words
    fixed, allowed, constrained = token_constraints(parse_target("syntax", "1-2:NOUN 0-4:AUX", ctx), ctx)
    assert fixed[0] == start and (fixed[1:] == -1).all()
    assert constrained[:6].all() and not constrained[6:].any()  # START and words 0..4 at positions 1..5
    assert not allowed[1:6][:, [start, end, pad]].any() and allowed[1:6].sum() == 5 * (allowed.shape[1] - 3)
    assert allowed[6:].all()  # past the last span anything, END included
    model = ctx.model
    clfs = {task: NoisyClassifier(NoisyClassifierConfig(task=task, seq_len=24, embed_dim=8, hidden_size=16,
                                                        num_layers=1, num_heads=2)) for task in ("pos", "syntax")}
    targets = {"pos": [pos, pos], "syntax": [parse_target("syntax", "0-4:AUX", ctx)] * 2}
    for implied in (True, False):
        c = ControlContext(model, ctx.tokenizer, GuidanceConfig(implied_length=implied), clfs)
        batch = make_control(targets, c)(0, 2, SamplingModelFn(model))
        tokens = [g for g, _ in batch.guide.guides if isinstance(g, TokenGuide)]
        assert len(tokens) == (2 if implied else 0) and len(batch.guide.guides) == len(tokens) + 2
        assert (batch.fixed is not None) == implied


def test_control_samples_at_the_given_temperature(ctx, monkeypatch):
    import difflm.control as control

    class Stop(Exception):
        pass

    seen = []

    def fake_generate(*args, **kwargs):
        seen.append(kwargs["temperature"])
        raise Stop

    monkeypatch.setattr(control, "generate", fake_generate)
    for temperature in (None, 0.7):
        with pytest.raises(Stop):
            control.controlled_generate(replace(ctx, temperature=temperature),
                                        {"length": [parse_target("length", "3", ctx)]})
    assert seen == [None, 0.7]


def test_success_measures():
    assert success(Target("content", "food=Italian", {"food": "Italian"}), [], "it serves italian food") == 1.0
    assert success(Target("content", "food=Italian", {"food": "Italian"}), [], "it serves French food") == 0.0
    assert success(Target("length", "3", 3), ["a", "b", "c"], "a b c") == 1.0
    assert success(Target("length", "3", 3), ["a", "b"], "a b") == 0.0
    assert success(Target("infill", "a _ c", ["a", None, "c"]), ["a", "x", "c"], "") == 1.0
    assert success(Target("infill", "a _ c", ["a", None, "c"]), ["a", "x", "d"], "") == 0.0


def test_classifier_free_guidance_combines_outputs(tiny_run):
    from difflm.modeling import TextDiffusionConfig, TextDiffusionModel

    torch.manual_seed(0)
    model = TextDiffusionModel(TextDiffusionConfig(vocab_size=10, seq_len=6, embed_dim=4, hidden_size=16,
                                                   num_layers=1, num_heads=2, intermediate_size=32, num_steps=20,
                                                   attributes=["food=A", "food=B"])).eval()
    torch.nn.init.normal_(model.attribute_embed.weight)
    x, t = torch.randn(2, 6, 4), torch.tensor([0.5, 0.5])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cond, uncond = model(x, t, attributes=a), model(x, t)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(SamplingModelFn(model, a, 0.0)(x, t), cond)
    torch.testing.assert_close(SamplingModelFn(model, a, 2.0)(x, t), 3 * cond - 2 * uncond)


# ---- commands end to end -----------------------------------------------------------------------------------------
def test_train_classifier_control_and_eval_control(tiny_run, tmp_path, capsys):
    clf_dir = tmp_path / "clf"
    code, _, err = run(capsys, "train-classifier", "--model", str(tiny_run), "--task", "content",
                       f"classifier.out_dir={clf_dir}", "--no-progress")
    assert code == 0, err
    assert load_classifier(str(clf_dir), load_model(tiny_run / "model")[0]).config.task == "content"
    out = tmp_path / "c.jsonl"
    code, stdout, err = run(capsys, "control", "--model", str(tiny_run), "--classifier", str(clf_dir),
                            "--task", "content,infill", "--target", "food=Italian", "--target",
                            "Aromi is _ _ _ . it serves _ food .", "--num-samples", "3", "--out", str(out),
                            "--batch-size", "2", "--no-progress")
    assert code == 0, err
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r["success"]) == {"content", "infill"} for r in rows)
    assert all(r["success"]["infill"] == 1.0 for r in rows)  # fixed tokens are imputed into every x0 estimate
    assert all(r["text"].startswith("Aromi is") for r in rows), rows
    assert "content 'food=Italian': success" in stdout and "infill" in stdout
    code, stdout, err = run(capsys, "eval-control", "--model", str(tiny_run), "--classifier", str(clf_dir),
                            "--tasks", "content,length,content+length", "--num-targets", "2", "--per-target", "2",
                            "--out", str(tmp_path / "ec"), "--no-progress")
    assert code == 0, err
    assert "| unguided |" in stdout and "| content+length |" in stdout and "length success %" in stdout
    table = json.loads((tmp_path / "ec" / "control.json").read_text())
    assert [r["name"] for r in table] == ["unguided", "content", "length", "content+length"]
    assert table[2]["success"]["length"] == 1.0  # the END and PAD positions are imputed, the rest guided
    assert len((tmp_path / "ec" / "samples.jsonl").read_text().splitlines()) == 16
    from difflm.card import read_card

    control = read_card(tiny_run / "model")[0]["difflm"]["control"]  # eval-control's figures in the model's card
    assert control["content+length"]["success"] == table[3]["success"] and control["samples_per_target"] == 2
    clf_facts = read_card(clf_dir / "model")[0]["difflm"]
    assert clf_facts["kind"] == "classifier" and clf_facts["architecture"]["task"] == "content"
    assert "final_dev_accuracy" in clf_facts["training"]


def test_a_classifier_on_the_models_x0_estimate_trains_and_guides(tiny_run, tmp_path, capsys, monkeypatch):
    """train-classifier classifier.reads=x0: trained on the frozen model's x0 estimates (not on x_t), saved with
    the setting, and used by control through the sampler's estimate."""
    import difflm.classifier as classifier_module

    calls = []
    original = classifier_module.model_x0

    def counting(model, x_t, t):
        calls.append(x_t.shape)
        return original(model, x_t, t)

    clf_dir = tmp_path / "clf"
    monkeypatch.setattr(classifier_module, "model_x0", counting)
    code, _, err = run(capsys, "train-classifier", "--model", str(tiny_run), "--task", "content",
                       f"classifier.out_dir={clf_dir}", "classifier.reads=x0", "classifier.max_steps=3",
                       "--no-progress")
    assert code == 0, err
    assert len(calls) >= 3  # every training step (and the evaluation) reads the model's estimate
    assert load_classifier(str(clf_dir), load_model(tiny_run / "model")[0]).config.reads == "x0"
    assert "classifier of the model's x0 estimates for the content task" in (clf_dir / "model" / "README.md").read_text()
    out = tmp_path / "c.jsonl"
    code, _, err = run(capsys, "control", "--model", str(tiny_run), "--classifier", str(clf_dir), "--task",
                       "content", "--target", "food=Italian", "--num-samples", "2", "--out", str(out),
                       "guidance.sampling_steps=5", "--no-progress")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 2
    code, _, err = run(capsys, "train-classifier", "--model", str(tiny_run), "--task", "content",
                       f"classifier.out_dir={tmp_path / 'bad'}", "classifier.reads=x1", "--no-progress")
    assert code == 2 and "unknown classifier.reads 'x1'; choose one of x_t, x0" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_control_bad_inputs(tiny_run, tmp_path, capsys):
    model, tok = load_model(tiny_run / "model")
    other = NoisyClassifier(NoisyClassifierConfig(task="content", fields={"food": ["Italian"]}, seq_len=24,
                                                  embed_dim=8, hidden_size=16, num_layers=1, num_heads=2,
                                                  diffusion_fingerprint="0" * 16))
    save_model(other, tok, tmp_path / "other")
    base = ["control", "--model", str(tiny_run), "--num-samples", "2", "--out", str(tmp_path / "o.jsonl")]
    cases = [(["--classifier", str(tmp_path / "other"), "--task", "content", "--target", "food=Italian"],
              "trained for another diffusion model"),
             (["--task", "content", "--target", "food=Italian"], "needs a noisy classifier"),
             (["--task", "length,infill", "--target", "3"], "give one --target per task"),
             (["--task", "length", "--target", "99"], "target length 99 does not fit"),
             (["--task", "infill", "--target", "Aromi is a pub"], "no free position"),
             (["--classifier", str(tmp_path), "--task", "length", "--target", "3"], "not a classifier directory"),
             (["--task", "content", "--target", "food=Italian", "--free"], "needs a model trained with"),
             (["--task", "length", "--target", "3", "guidance.step_size=0"], "guidance.step_size must be positive"),
             (["--task", "length", "--target", "3", "guidance.sampler=dpm++", "guidance.order=4"],
              "guidance.sampler/grid/order/eta: dpm++ has orders 1 to 3, got order 4"),
             (["--task", "length", "--target", "3", "guidance.grid=warp"], "the warp grid needs a model trained"),
             (["--task", "length", "--target", "3", "--temperature", "0.5"], "needs a model with categorical output"),
             (["--task", "length", "--target", "3", "--temperature", "-1"], "must be a positive number")]
    for extra, message in cases:
        code, _, err = run(capsys, *base, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "o.jsonl").exists()
    code, _, err = run(capsys, "train-classifier", "--model", str(tiny_run), "--task", "length")
    assert code == 2 and "length and infill need no classifier" in err
    code, _, err = run(capsys, "eval-control", "--model", str(tiny_run), "--tasks", "length+dance",
                       "--out", str(tmp_path / "ec"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown task 'dance'; choose one of content, length, infill, pos, syntax, content-free (in --tasks" in err
    assert not (tmp_path / "ec").exists()


def test_control_with_dpm_solver(tiny_run, tmp_path, capsys):
    """Guidance is a hook of every sampler: a length target through DPM-Solver++ on the log-SNR grid."""
    out = tmp_path / "o.jsonl"
    code, _, err = run(capsys, "control", "--model", str(tiny_run), "--task", "length", "--target", "4",
                       "--num-samples", "3", "--out", str(out), "guidance.sampler=dpm++", "guidance.grid=logsnr",
                       "guidance.sampling_steps=20", "--no-progress")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 3


def test_classifier_free_training_and_control(tmp_path, capsys):
    out = tmp_path / "cfg"
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={out}", "model.attributes=true",
                       "train.max_steps=4", "train.eval_every=2", "--no-progress")
    assert code == 0, err
    model, _ = load_model(out / "model")
    assert "food=Italian" in model.config.attributes and model.attribute_embed is not None
    code, stdout, err = run(capsys, "control", "--model", str(out), "--free", "--task", "content", "--target",
                            "food=Italian", "--num-samples", "2", "--out", str(tmp_path / "f.jsonl"), "--no-progress")
    assert code == 0 and "content 'food=Italian': success" in stdout, err

    # data-to-text: generate --meanings conditions sample i on line i mod lines, and says which in its output
    meanings = tmp_path / "m.txt"
    meanings.write_text("food[Italian]\n\nfood[Italian], area[by the riverside]\n", encoding="utf-8")
    samples = tmp_path / "m.jsonl"
    code, _, err = run(capsys, "generate", "--model", str(out), "--meanings", str(meanings), "--num-samples", "3",
                       "--steps", "4", "--free-weight", "1", "--out", str(samples), "--no-progress")
    assert code == 0, err
    assert [json.loads(r)["meaning"] for r in samples.read_text().splitlines()] == [
        "food[Italian]", "food[Italian], area[by the riverside]", "food[Italian]"]
    names = model.config.attributes
    control = meaning_control(model, ["food[Italian]", "area[by the riverside]"], weight=0.5)
    fn = control(2, 5, SamplingModelFn(model)).model_fn
    expected = torch.zeros(3, len(names))
    expected[[0, 2], names.index("food=Italian")] = 1
    expected[1, names.index("area=by the riverside")] = 1
    assert torch.equal(fn.attributes, expected) and fn.weight == 0.5

    meanings.write_text("food[Italian]\nfood[Martian]\n", encoding="utf-8")
    code, _, err = run(capsys, "generate", "--model", str(out), "--meanings", str(meanings), "--num-samples", "2",
                       "--steps", "4", "--out", str(tmp_path / "bad.jsonl"), "--no-progress")
    assert code == 2 and "meaning 2 states food[Martian]" in err and "food[Italian]" in err, err
    assert "Traceback" not in err and not (tmp_path / "bad.jsonl").exists()
    meanings.write_text("Italian food please\n", encoding="utf-8")
    code, _, err = run(capsys, "generate", "--model", str(out), "--meanings", str(meanings), "--num-samples", "2",
                       "--steps", "4", "--out", str(tmp_path / "bad.jsonl"), "--no-progress")
    assert code == 2 and "states no field[value] pair" in err, err


def test_meanings_need_a_conditioned_model(tiny_run, tmp_path, capsys):
    meanings = tmp_path / "m.txt"
    meanings.write_text("food[Italian]\n", encoding="utf-8")
    common = ["generate", "--model", str(tiny_run), "--num-samples", "2", "--steps", "4",
              "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    code, _, err = run(capsys, *common, "--meanings", str(meanings))
    assert code == 2 and "model.attributes=true" in err, err
    code, _, err = run(capsys, *common, "--meanings", str(tmp_path / "absent.txt"))
    assert code == 2 and "does not exist" in err, err
    code, _, err = run(capsys, *common, "--free-weight", "1")
    assert code == 2 and "--meanings" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_attributes_without_meaning_representations_name_the_ways_out(tmp_path, capsys):
    """The e2e configs train with model.attributes: data without an mr column is refused in one line that says
    how to give one or to train without."""
    data = tmp_path / "t.txt"
    data.write_text("".join(f"the cat sat on mat {i % 7} .\n" for i in range(40)))
    out = tmp_path / "cfg"
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={out}", "model.attributes=true",
                       f"data.source={data}", "data.dev_source=", "data.mr_column=", "train.max_steps=2",
                       "--no-progress")
    assert code == 2 and "data.mr_column" in err and "model.attributes=false" in err, err
    assert "Traceback" not in err and not (out / "model").exists()


# ---- parts of speech and syntax (the optional spaCy extra) -------------------------------------------------------
def test_missing_spacy_names_the_extra(monkeypatch):
    from difflm import tagging

    tagging.load_spacy.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(DifflmError, match=r"pip install 'difflm\[control\]'"):
        tagging.load_spacy()
    tagging.load_spacy.cache_clear()


def test_pos_tags_and_subtree_spans_of_our_tokens():
    pytest.importorskip("spacy", reason="the control extra (spaCy) is not installed")
    from difflm.tagging import parse, pos_tags, subtree_spans

    (doc,) = parse([["Aromi", "is", "a", "cheap", "pub", "."]])
    assert [t.text for t in doc] == ["Aromi", "is", "a", "cheap", "pub", "."]  # our tokens, not spaCy's
    tags = pos_tags(doc)
    assert tags[0] == "PROPN" and tags[-1] == "PUNCT" and tags[4] == "NOUN"
    spans = subtree_spans(doc)
    assert (2, 4, "NOUN") in spans and all(j > i for i, j, _ in spans)
    assert success(Target("pos", "", tags), [t.text for t in doc], "", doc) == 1.0
    assert success(Target("syntax", "", [(2, 4, "NOUN"), (0, 1, "VERB")]), [], "", doc) == 0.5


def test_pos_and_syntax_control_end_to_end(tiny_run, tmp_path, capsys):
    pytest.importorskip("spacy", reason="the control extra (spaCy) is not installed")
    for task in ("pos", "syntax"):
        code, _, err = run(capsys, "train-classifier", "--model", str(tiny_run), "--task", task,
                           f"classifier.out_dir={tmp_path / task}", "classifier.max_steps=4", "--no-progress")
        assert code == 0, err
    out = tmp_path / "p.jsonl"
    code, stdout, err = run(capsys, "control", "--model", str(tiny_run), "--classifier", str(tmp_path / "pos"),
                            "--classifier", str(tmp_path / "syntax"), "--task", "pos,syntax", "--target",
                            "PROPN AUX DET NOUN PUNCT", "--target", "2-3:NOUN", "--num-samples", "2",
                            "--out", str(out), "--no-progress")
    assert code == 0, err
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert all(0 <= r["success"]["pos"] <= 1 and r["success"]["syntax"] in (0.0, 1.0) for r in rows)
