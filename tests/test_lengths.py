"""model.explicit_length: p(n) p(words | n), PAD positions given rather than diffused; batches bucketed and trimmed."""

import json
import math

import pytest
import torch

from difflm.control import ControlContext, make_control, parse_target
from difflm.config import GuidanceConfig
from difflm.data import encode
from difflm.metrics import bound_report
from difflm.text import TextObjective, generate, load_model, text_elbo, trim_given_pad
from difflm.train import BatchStream

from conftest import ROOT
from test_cli import assert_user_error
from test_likelihood import ELBO
from test_text import TEXTS, small_model, tokenizer  # noqa: F401 (a fixture)

TINY = str(ROOT / "configs" / "tiny.yaml")
EXPLICIT = {"model.explicit_length": "true", "model.output": "logits"}


def _ids(tokenizer, texts, length=16):
    return encode(texts, tokenizer, length)[0]


def test_pad_positions_are_given_exactly_and_hidden_from_the_rest(tokenizer):
    torch.manual_seed(0)
    model = small_model(tokenizer, **EXPLICIT, **{"model.self_condition": "true"}).eval()
    ids = _ids(tokenizer, TEXTS)
    n = model.lengths(ids)
    assert n.tolist() == [len(t.split()) + 2 for t in TEXTS]
    x, t = torch.randn(3, 16, 8), torch.tensor([0.3, 0.6, 0.9])
    out, logits = model(x, t, return_logits=True, lengths=n)
    pad = torch.arange(16)[None] >= n[:, None]
    e_pad = model.embedding_matrix()[model.config.pad_id]
    assert torch.equal(out[pad], e_pad.expand(int(pad.sum()), -1))  # exactly Emb(PAD)
    assert torch.equal(logits[pad].argmax(-1), torch.full((int(pad.sum()),), model.config.pad_id))
    # what the PAD positions hold changes nothing elsewhere, and neither does cutting them off
    other = torch.where(pad[..., None], torch.randn(3, 16, 8) * 5, x)
    torch.testing.assert_close(model(other, t, lengths=n)[~pad], out[~pad])
    w = int(n.max())
    torch.testing.assert_close(model(x[:, :w], t, lengths=n)[~pad[:, :w]], out[~pad])
    assert trim_given_pad(model, ids).shape == (3, w)


def test_the_bound_has_no_pad_terms_and_pays_for_the_length(tokenizer):
    torch.manual_seed(0)
    model = small_model(tokenizer, **{**ELBO, **EXPLICIT}).eval()
    ids = _ids(tokenizer, TEXTS * 4)
    model.set_lengths(ids)
    t = torch.full((len(ids),), 0.5)
    full = text_elbo(model, ids, torch.Generator().manual_seed(0), t=t)
    cut = text_elbo(model, trim_given_pad(model, ids), torch.Generator().manual_seed(0), t=t)
    # a trimmed batch draws its noise in another shape, so only the deterministic prior compares exactly
    torch.testing.assert_close(full.prior, cut.prior)
    assert torch.all(full.reconstruction > 0) and torch.all(full.diffusion > 0)
    counts = torch.bincount(model.lengths(ids), minlength=17).double()
    counts[2:] += 0.5
    p = counts / counts.sum()
    report = bound_report(model, ids, draws=2)
    expected = -torch.log(p[model.lengths(ids)]).mean().item()
    assert report.terms_per_sequence["length"] == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(-math.log(p[5].item()))  # a length never seen keeps a finite price


def test_lengths_are_drawn_from_the_training_distribution_within_bounds(tokenizer):
    model = small_model(tokenizer, **EXPLICIT)
    ids = torch.full((1000, 16), model.config.pad_id)
    ids[:, :2] = 5
    ids[:700, 2:6] = 5  # 70% of length 6, 30% of length 2
    model.set_lengths(ids, smoothing=0.0)
    g = torch.Generator().manual_seed(0)
    n = model.draw_lengths(4000, g)
    assert set(n.tolist()) == {2, 6} and abs((n == 6).float().mean().item() - 0.7) < 0.03
    low, high = torch.full((4000,), 3), torch.full((4000,), 16)
    assert torch.all(model.draw_lengths(4000, g, low, high) == 6)
    with pytest.raises(Exception, match="leave no length possible"):
        model.draw_lengths(2, g, torch.tensor([7, 7]), torch.tensor([9, 9]))


def test_bucketed_batches_cover_the_epoch_hold_similar_lengths_and_resume_exactly():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 40, (640,), generator=g)
    ids = torch.arange(640)[:, None]
    stream = BatchStream(ids, 16, seed=0, lengths=lengths, window=8)
    epoch = [next(stream) for _ in range(40)]
    assert sorted(torch.cat(epoch).flatten().tolist()) == list(range(640))  # each row once
    spread = sum(int(lengths[b.flatten()].max() - lengths[b.flatten()].min()) for b in epoch) / 40
    plain = BatchStream(ids, 16, seed=0)
    random_spread = sum(int(lengths[b.flatten()].max() - lengths[b.flatten()].min())
                        for b in (next(plain) for _ in range(40))) / 40
    assert spread < random_spread / 3
    state = stream.state_dict()
    ahead = [next(stream) for _ in range(45)]  # across the epoch's end
    again = BatchStream(ids, 16, seed=0, lengths=lengths, window=8)
    again.load_state_dict(state)
    assert all(torch.equal(a, next(again)) for a in ahead)


def test_samples_end_where_their_drawn_length_says_and_length_control_sets_it(tokenizer):
    torch.manual_seed(0)
    model = small_model(tokenizer, **EXPLICIT).eval()
    model.set_lengths(_ids(tokenizer, TEXTS * 10), smoothing=0.0)
    pad = model.config.pad_id
    drawn = {len(t.split()) + 2 for t in TEXTS}
    for s in generate(model, tokenizer, 12, steps=3, seed=1):
        n = sum(i != pad for i in s.ids)
        assert n in drawn and all(i == pad for i in s.ids[n:])
    ctx = ControlContext(model=model, tokenizer=tokenizer, guidance=GuidanceConfig(sampling_steps=3))
    targets = {"length": [parse_target("length", "7", ctx)] * 3}
    for s in generate(model, tokenizer, 3, steps=3, control=make_control(targets, ctx)):
        assert sum(i != pad for i in s.ids) == 9 and s.ids[8] == model.config.end_id  # START, 7 words, END


@pytest.mark.parametrize("objective", [{}, ELBO])
def test_an_explicit_length_run_trains_on_bucketed_trimmed_batches_and_samples(tmp_path, objective):
    from difflm.cli import main

    out = tmp_path / "run"
    run = [f"{k}={v}" for k, v in {**objective, **EXPLICIT, "model.ce_weight": "1"}.items()] + ["train.max_steps=12"]
    assert main(["train", "--config", TINY, f"train.out_dir={out}", *run, "--no-progress"]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    model, tok = load_model(out / "model")
    assert model.config.explicit_length and torch.isfinite(model.length_log_prob[2:]).all()
    assert torch.softmax(model.length_log_prob, 0).sum().item() == pytest.approx(1.0)
    samples = tmp_path / "s.jsonl"
    assert main(["generate", "--model", str(out), "--num-samples", "4", "--steps", "3", "--out", str(samples),
                 "--no-progress"]) == 0
    assert len(samples.read_text().splitlines()) == 4


def test_explicit_length_needs_x0_and_has_no_weighted_bound(tmp_path, capsys, tokenizer):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "model.explicit_length=true",
                               "diffusion.prediction=eps"], "model.explicit_length gives the PAD positions' x0")
    assert not (tmp_path / "o").exists()
    from difflm.cli import main

    out = tmp_path / "w"
    assert main(["train", "--config", TINY, f"train.out_dir={out}", "model.explicit_length=true", "train.max_steps=2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert_user_error(capsys, ["eval", "--model", str(out), "--out", str(tmp_path / "e"), "--metrics", "bound",
                               "--no-progress"], "drop bound from --metrics")


def test_an_explicit_length_objective_is_the_same_on_a_trimmed_batch(tokenizer):
    """TextObjective trims a batch to its longest row; PAD positions carry no loss, so the training loss per
    position (the ELBO's, normalised by the model's full length) does not depend on the padding's extent."""
    model = small_model(tokenizer, **{**ELBO, **EXPLICIT}).eval()
    ids = _ids(tokenizer, TEXTS)
    objective = TextObjective(model)
    a = objective(ids, torch.Generator().manual_seed(0)).loss
    b = objective(trim_given_pad(model, ids), torch.Generator().manual_seed(0)).loss
    torch.testing.assert_close(a, b)
