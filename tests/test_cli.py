"""The command line end to end, and every bad input the foundation issue names."""

import json
import subprocess
import sys

import pytest

from difflm.cli import main

from conftest import ROOT, SHARED_DATA

TINY = str(ROOT / "configs" / "tiny.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_generate_check_grammar(tiny_run, tmp_path, capsys):
    metrics = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 30 and "dev_loss_ema" in metrics[-1]
    assert (tiny_run / "model" / "model.safetensors").is_file() and (tiny_run / "checkpoint").is_dir()
    out = tmp_path / "samples.jsonl"
    code, stdout, _ = run(capsys, "generate", "--model", str(tiny_run), "--num-samples", "5", "--out", str(out),
                          "--steps", "10", "--sampler", "ddim", "--clamp", "--batch-size", "2", "--show", "2",
                          "--no-progress")
    assert code == 0 and len(stdout.splitlines()) == 2
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["ids"]) == 24 and isinstance(r["text"], str) for r in rows)
    code, stdout, _ = run(capsys, "check-grammar", "--samples", str(out))
    assert code == 0 and "grammatical:" in stdout and "/5 =" in stdout


def test_cli_as_a_process_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "difflm.cli", "generate", "--model", str(tmp_path / "none"),
                           "--num-samples", "2", "--out", str(tmp_path / "o.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"difflm: error: model directory {tmp_path / 'none'} does not "
                                                "exist; train one with `difflm train`"]


def assert_user_error(capsys, argv, message, out_dir=None):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflm: error: ") and message in lines[0], err
    if out_dir is not None:
        assert not (out_dir / "model").exists() and not (out_dir / "checkpoint").exists()


def test_data_path_missing(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path}", "data.source=missing.csv"],
                      "data path missing.csv does not exist", tmp_path)


def test_dataset_empty(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("text\n")
    (tmp_path / "blank.csv").write_text("text\n\n  \n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "spaces.csv").write_text("id,text\n1, \n")
    for name in ("empty.csv", "blank.csv", "empty.txt", "spaces.csv"):
        assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path}",
                                   f"data.source={tmp_path / name}"], f"dataset {tmp_path / name} is empty", tmp_path)


def test_text_column_missing_lists_columns(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("mr,ref\na,Aromi is a pub .\nb,Zizzi is a pub .\n")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path}", f"data.source={tmp_path / 'd.csv'}",
                               "data.text_column=human_reference"], "its columns are mr, ref", tmp_path)


def test_unknown_config_key_suggests(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--config", TINY, "train.max_step=3"], "did you mean 'max_steps'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 3\n")
    assert_user_error(capsys, ["train", "--config", str(bad)], "did you mean 'hidden_size'")


def test_wrong_type_in_override(capsys):
    assert_user_error(capsys, ["train", "--config", TINY, "train.lr=fast"], "train.lr must be float, got 'fast'")


def test_model_directory_missing_or_foreign(tmp_path, capsys):
    assert_user_error(capsys, ["generate", "--model", str(tmp_path / "x"), "--num-samples", "1", "--out",
                               str(tmp_path / "o.jsonl")], "does not exist")
    assert_user_error(capsys, ["generate", "--model", str(tmp_path), "--num-samples", "1", "--out",
                               str(tmp_path / "o.jsonl")], "is not a difflm model directory")
    assert not (tmp_path / "o.jsonl").exists()


def test_sequence_length_below_three(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path}", "data.seq_len=2"],
                      "data.seq_len must be at least 3", tmp_path)


def test_num_samples_not_positive(tiny_run, tmp_path, capsys):
    for n in ("0", "-3"):
        assert_user_error(capsys, ["generate", "--model", str(tiny_run), "--num-samples", n, "--out",
                                   str(tmp_path / "o.jsonl")], "--num-samples must be positive")
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_config_file_and_bad_samples(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "not found")
    assert_user_error(capsys, ["check-grammar", "--samples", str(tmp_path / "nope.jsonl")], "does not exist")
    (tmp_path / "e.jsonl").write_text("")
    assert_user_error(capsys, ["check-grammar", "--samples", str(tmp_path / "e.jsonl")], "is empty")


@pytest.mark.skipif(not (SHARED_DATA / "e2e" / "devset.csv").is_file(), reason="../shared/data/e2e is not here")
def test_trains_on_local_e2e_csv(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={tmp_path}", "train.max_steps=3",
                       f"data.source={SHARED_DATA / 'e2e' / 'devset.csv'}", "data.text_column=ref",
                       "data.seq_len=64", "data.min_freq=3", "train.eval_every=3", "--no-progress")
    assert code == 0, err
    assert "4672 train" not in err and "vocabulary" in err and (tmp_path / "model" / "tokenizer.json").is_file()


def test_hub_id_without_network_is_a_clean_error(tmp_path, capsys):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path}", "data.source=tuetschek/e2e_nlg",
                               "data.text_column=human_reference"], "could not load Hub dataset 'tuetschek/e2e_nlg'",
                      tmp_path)


def test_dataset_directory_with_splits(tmp_path, capsys):
    """A dataset repository on disk goes through the same split logic as a Hub id (train / validation)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.csv").write_text("human_reference\n" + "Aromi is a pub .\nZizzi is a cheap pub .\n" * 20)
    (repo / "validation.csv").write_text("human_reference\nThe Eagle is a pub .\n")
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={tmp_path / 'out'}", f"data.source={repo}",
                       "data.text_column=human_reference", "train.max_steps=2", "train.eval_every=2", "--no-progress")
    assert code == 0, err
    assert "40 train / 1 dev texts" in err


@pytest.mark.parametrize("override,message", [
    ("diffusion.schedule=sqrtt", "unknown diffusion.schedule 'sqrtt'"),
    ("diffusion.prediction=noise", "unknown diffusion.prediction 'noise'"),
    ("data.modality=audio", "unknown data.modality 'audio'; choose one of text, image"),
    ("model.num_heads=3", "must be divisible by model.num_heads"),
    ("train.batch_size=0", "train.batch_size must be positive"),
    ("train.lr=-1", "train.lr must be positive, got -1.0"),
    ("model.hidden_size=0", "model.hidden_size must be positive, got 0"),
    ("model.embed_dim=0", "model.embed_dim must be positive, got 0"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1], got 1.5"),
    ("train.grad_clip=nan", "train.grad_clip must be zero or more, got nan"),
    ("guidance.step_size=0", "guidance.step_size must be positive"),
])
def test_bad_model_settings_fail_before_anything_is_written(tmp_path, capsys, override, message):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", override], message)
    assert not (tmp_path / "o").exists()
