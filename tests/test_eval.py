"""Teacher LM, lm-score and `difflm eval` end to end, with the evaluation issue's bad inputs."""

import json
import math

import pytest
import torch

from difflm.cli import main
from difflm.teacher import lm_score, load_teacher

from conftest import ROOT
from test_cli import assert_user_error, run

TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def teacher_dir(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", "--model", str(tiny_run), f"teacher.out_dir={out}", "teacher.max_steps=40",
                 "teacher.hidden_size=32", "teacher.num_layers=1", "teacher.num_heads=2", "teacher.eval_every=20",
                 "teacher.batch_size=16", "--no-progress"]) == 0
    return out


def test_teacher_learns_and_scores(teacher_dir, tiny_run):
    from difflm.text import load_model

    model, tok = load_model(tiny_run / "model")
    teacher, teacher_tok = load_teacher(str(teacher_dir), tok)
    rows = [json.loads(l) for l in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and rows[-1]["dev_perplexity"] < len(tok)  # better than uniform
    good = lm_score(teacher, teacher_tok, ["Aromi is a pub .", "Zizzi is a cheap pub ."], model.config.seq_len)
    bad = lm_score(teacher, teacher_tok, ["pub a is . Aromi", "cheap . Zizzi pub a is"], model.config.seq_len)
    assert 1 < good < bad
    from difflm.card import read_card

    facts = read_card(teacher_dir / "model")[0]["difflm"]  # the teacher's model card
    assert facts["kind"] == "teacher" and facts["training"]["steps"] == 40
    assert facts["training"]["final_dev_perplexity"] == pytest.approx(rows[-1]["dev_perplexity"], rel=1e-5)
    assert facts["architecture"]["n_layer"] == 1 and (teacher_dir / "training.png").is_file()


def test_lm_score_is_exp_of_mean_token_nll(teacher_dir, tiny_run):
    from difflm.data import encode
    from difflm.teacher import sequence_nll
    from difflm.text import load_model

    _, tok = load_model(tiny_run / "model")
    teacher, teacher_tok = load_teacher(str(teacher_dir), tok)
    ids, _ = encode(["Aromi is a pub ."], teacher_tok, 24)
    logp = torch.log_softmax(teacher(input_ids=ids).logits[0], -1)
    n = len("Aromi is a pub .".split()) + 1  # words + END
    manual = -sum(logp[i, ids[0, i + 1]].item() for i in range(n)) / n
    nll, count = sequence_nll(teacher, ids, teacher_tok.pad_token_id)
    assert count.item() == n and nll.item() / n == pytest.approx(manual, rel=1e-5)
    assert lm_score(teacher, teacher_tok, ["Aromi is a pub ."], 24) == pytest.approx(math.exp(manual), rel=1e-5)


def test_lm_score_of_a_model_longer_than_the_teacher(teacher_dir, tiny_run, caplog):
    from difflm.text import load_model

    _, tok = load_model(tiny_run / "model")
    teacher, teacher_tok = load_teacher(str(teacher_dir), tok)
    positions = teacher.config.n_positions
    fits = ["Aromi is a pub .", "Zizzi is a cheap pub ."]
    assert lm_score(teacher, teacher_tok, fits, 2 * positions) == pytest.approx(
        lm_score(teacher, teacher_tok, fits, positions), rel=1e-6)  # PAD columns beyond the teacher: exact
    long = " ".join(["Aromi is a pub ."] * positions)
    with caplog.at_level("WARNING", logger="difflm"):
        score = lm_score(teacher, teacher_tok, fits + [long], 2 * positions)
    assert math.isfinite(score) and f"1 of 3 texts are longer than the teacher's {positions} positions" in caplog.text


def test_eval_writes_json_markdown_and_plots(tiny_run, teacher_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    code, _, err = run(capsys, "eval", "--model", str(tiny_run), "--teacher", str(teacher_dir), "--out", str(out),
                       "--num-samples", "8", "--steps", "10", "--held-out", "16", "--bound-draws", "4", "--no-progress")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(m) == {"bound_discrete", "bound_continuous", "lm_score", "diversity", "diversity_held_out", "grammar"}
    b = m["bound_discrete"]
    assert sum(v * (-1 if k == "entropy" else 1) for k, v in b["terms_per_sequence"].items()) == pytest.approx(
        b["nats_per_sequence"]["mean"], rel=1e-6)  # the terms add up to the bound
    assert b["bits_per_token"]["mean"] == pytest.approx(b["nats_per_token"]["mean"] / math.log(2))
    report = (out / "report.md").read_text()
    assert "lm-score" in report and "perplexity bound" in report
    for png in ("denoising.png", "elbo_terms.png", "trajectories.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # a report written into a training run's folder leaves the run alone
    code, _, err = run(capsys, "eval", "--model", str(tiny_run), "--out", str(tiny_run), "--metrics", "diversity",
                       "--num-samples", "4", "--steps", "5", "--no-progress")
    assert code == 0, err
    assert (tiny_run / "model" / "model.safetensors").is_file() and (tiny_run / "report.md").is_file()
    assert not list(tiny_run.glob(".report.*"))


def test_eval_of_the_bound_alone_generates_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    import difflm.evaluation

    def no_generation(*args, **kwargs):
        raise AssertionError("generated samples that no metric asked for")

    monkeypatch.setattr(difflm.evaluation, "generate", no_generation)
    out = tmp_path / "ev"
    code, _, err = run(capsys, "eval", "--model", str(tiny_run), "--out", str(out), "--metrics", "bound",
                       "--held-out", "8", "--bound-draws", "2", "--no-progress")
    assert code == 0, err
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["samples"] == 0 and saved["examples"] == [] and "bound_continuous" in saved["metrics"]
    assert "No samples (no metric asked for them); 8 held-out texts." in (out / "report.md").read_text()


def test_eval_bad_inputs(tiny_run, teacher_dir, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_run), "--out", str(tmp_path / "ev"), "--num-samples", "4", "--steps", "5"]
    assert_user_error(capsys, base + ["--samples", str(tmp_path / "none.jsonl")], "does not exist")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_user_error(capsys, base + ["--samples", str(tmp_path / "empty.jsonl")], "is empty")
    assert_user_error(capsys, base + ["--metrics", "bound,bleurt"], "unknown metric 'bleurt'")
    assert_user_error(capsys, base + ["--metrics", "lm_score"], "lm_score needs --teacher")
    assert_user_error(capsys, ["eval", "--model", str(tmp_path), "--out", str(tmp_path / "ev")],
                      "is not a difflm model directory")
    # a teacher trained with another tokenizer
    other = tmp_path / "other"
    assert main(["train-teacher", "--config", TINY, "data.builtin_train=40", "data.min_freq=3",
                 f"teacher.out_dir={other}", "teacher.max_steps=1", "teacher.hidden_size=16", "teacher.num_layers=1",
                 "teacher.num_heads=2", "--no-progress"]) == 0
    capsys.readouterr()
    assert_user_error(capsys, base + ["--teacher", str(other)], "uses a different tokenizer")
    assert not (tmp_path / "ev").exists()


def test_metrics_load_offline_as_evaluate_modules(tiny_run, teacher_dir):
    import evaluate

    from difflm.errors import DifflmError
    from difflm.evaluate_modules import MODULES, module_path

    texts = ["Aromi is a pub .", "Zizzi is a cheap pub ."]
    mods = {name: evaluate.load(module_path(name)) for name in MODULES}
    div = mods["diversity"].compute(predictions=texts, reference_texts=texts)
    assert div["distinct_1"] == pytest.approx(7 / 11) and div["reference_unigram_entropy"] > 0
    assert mods["grammar"].compute(predictions=texts + ["pub pub"])["grammatical_share"] == pytest.approx(2 / 3)
    score = mods["lm_score"].compute(predictions=texts, teacher=str(teacher_dir), seq_len=24)["lm_score"]
    assert score > 1
    bound = mods["elbo_bound"].compute(predictions=texts, model=str(tiny_run / "model"), draws=2)
    assert bound["sequences"] == 2 and bound["nats_per_token"]["mean"] > 0
    with pytest.raises(DifflmError, match="unknown metric module"):
        module_path("rouge")
