"""Bad input is one line `difflm: error: ...` with exit code 2 and nothing written; no run is overwritten or cut
without a checkpoint (the portability issue's classes of mistakes, one test each)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from difflm.config import load_config
from difflm.train import StopSignals, train

from conftest import ROOT, subprocess_env
from test_cli import assert_user_error, run

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_an_out_dir_that_cannot_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'file'}"],
                      "is an existing file, not a directory")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'file' / 'run'}"],
                      "which is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_an_existing_run_is_kept_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config", TINY, f"train.out_dir={out}", "train.max_steps=4", "train.eval_every=2"]
    assert run(capsys, *base, "--no-progress")[0] == 0
    weights, lines = (out / "model" / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    assert_user_error(capsys, base + ["train.seed=1"], "already holds a run (model, checkpoint, metrics.jsonl); "
                      "continue it with --resume, replace it with --overwrite")
    assert (out / "model" / "model.safetensors").read_bytes() == weights

    # --resume on a finished run: it says so, with the run's last dev loss, and rewrites nothing
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    code, _, err = run(capsys, *base, "--no-progress", "--resume")
    last = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert code == 0 and "already complete (4 of 4 steps)" in err and f"{last['dev_loss_ema']:.4f}" in err
    assert "nan" not in err and (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp

    code, _, err = run(capsys, *base, "train.seed=1", "--no-progress", "--overwrite")
    assert code == 0, err
    assert (out / "model" / "model.safetensors").read_bytes() != weights
    new_lines = (out / "metrics.jsonl").read_text()
    assert new_lines != lines and len(new_lines.splitlines()) == len(lines.splitlines())  # the old lines are gone


def test_teacher_and_classifier_runs_are_kept_too(tiny_run, tmp_path, capsys):
    out = tmp_path / "teacher"
    base = ["train-teacher", "--model", str(tiny_run), f"teacher.out_dir={out}", "teacher.max_steps=2",
            "teacher.eval_every=2", "--no-progress"]
    assert run(capsys, *base)[0] == 0
    assert_user_error(capsys, base, "teacher.out_dir=")
    assert run(capsys, *base, "--overwrite")[0] == 0


def _corrupt(path, how):
    data = path.read_bytes()
    path.write_bytes(os.urandom(len(data)) if how == "random" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_corrupt_weights_in_any_model_directory_are_one_line_errors(tiny_run, tmp_path, capsys, how):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_run / "model", model)
    teacher, clf = tmp_path / "teacher", tmp_path / "clf"
    assert run(capsys, "train-teacher", "--model", str(model), f"teacher.out_dir={teacher}", "teacher.max_steps=2",
               "teacher.eval_every=2", "--no-progress")[0] == 0
    assert run(capsys, "train-classifier", "--model", str(model), "--task", "content", f"classifier.out_dir={clf}",
               "classifier.max_steps=2", "classifier.eval_every=2", "--no-progress")[0] == 0
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"text": "Aromi is a pub ."}\n')
    for weights, argv in (
            (model, ["generate", "--model", str(model), "--num-samples", "2", "--out", str(tmp_path / "o.jsonl")]),
            (teacher / "model", ["eval", "--model", str(tiny_run), "--teacher", str(teacher), "--samples",
                                 str(samples), "--metrics", "lm_score", "--out", str(tmp_path / "e")]),
            (clf / "model", ["control", "--model", str(tiny_run), "--classifier", str(clf), "--task", "content",
                             "--target", "food=Italian", "--num-samples", "2", "--out", str(tmp_path / "o.jsonl")])):
        _corrupt(weights / "model.safetensors", how)
        assert_user_error(capsys, argv, "its files are corrupt, truncated or of another model")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "e").exists()


def test_a_csv_that_is_not_utf8_names_the_place_and_the_fix(tmp_path, capsys):
    data = tmp_path / "latin1.csv"
    data.write_bytes("ref\nAromi is a pub .\nThe caf\u00e9 is cheap .\n".encode("latin-1"))
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", f"data.source={data}",
                               "data.text_column=ref"],
                      "is not UTF-8: byte 0xe9 at line 3, column 8 (offset 28); re-encode it, e.g. `iconv -f latin1")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be between 1 and the model's 100 diffusion steps, got 0"),
    (["--steps", "999999"], "--steps must be between 1 and the model's 100 diffusion steps, got 999999"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--num-samples", "0"], "--num-samples must be positive, got 0"),
    (["--precision", "fp8"], "--precision 'fp8' is unknown"),
])
def test_bad_sampling_arguments_fail_before_any_output(tiny_run, tmp_path, capsys, args, message):
    argv = ["generate", "--model", str(tiny_run), "--out", str(tmp_path / "o.jsonl")]
    argv += ["--num-samples", "2"] * ("--num-samples" not in args) + args
    assert_user_error(capsys, argv, message)  # one line on stderr: no progress bar was drawn first
    assert not (tmp_path / "o.jsonl").exists()


# ---- signals -------------------------------------------------------------------------------------------------------
RUN = ["train.max_steps=300", "train.save_every=50", "train.log_every=1", "train.eval_every=100",
       "model.dropout=0.1", "model.self_condition=true"]


def logged(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _start(out, *extra):
    return subprocess.Popen([sys.executable, "-m", "difflm.cli", "train", "--config", TINY, f"train.out_dir={out}",
                             *RUN, *extra, "--no-progress"], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, out, steps, limit=120):
    """Until `steps` steps are logged (the run is in its loop), while the process lives."""
    deadline = time.time() + limit
    while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.time() < deadline, "training ended before it was signalled"
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_follows_the_uninterrupted_one(tmp_path, signum):
    """SIGTERM (what schedulers send) and SIGINT (Ctrl-C) finish the step, save a checkpoint atomically, say how
    to resume and exit 128 + the signal; --resume then continues the uninterrupted trajectory exactly."""
    train(load_config(TINY, [f"train.out_dir={tmp_path / 'straight'}", *RUN]), show_progress=False)
    out = tmp_path / "stopped"
    proc = _start(out)
    _wait_for_steps(proc, out, 5)  # before the first periodic checkpoint (step 50)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    line = err.strip().splitlines()[-1]
    state = __import__("torch").load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert line.startswith(f"difflm: stopped by {signal.Signals(signum).name} at step {state['step']} of 300; "
                           f"checkpoint saved in {out / 'checkpoint'}; resume with: difflm train ")
    assert line.endswith(" --resume") and 5 <= state["step"] < 50
    assert not (out / ".checkpoint.partial").exists()
    resumed = train(load_config(TINY, [f"train.out_dir={out}", *RUN]), show_progress=False, resume=True)
    assert resumed.steps == 300 and logged(out) == pytest.approx(logged(tmp_path / "straight"), rel=1e-6, abs=0)


def test_a_second_signal_ends_at_once():
    """After the first signal the default actions are back: a second SIGINT raises KeyboardInterrupt at once (and
    a second SIGTERM would end the process); leaving the block restores the handlers it found."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert signals.received == signal.SIGINT
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
