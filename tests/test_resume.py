"""Exact resume: a run killed with SIGKILL and restarted with --resume follows the uninterrupted trajectory."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from difflm.config import load_config
from difflm.train import train

from conftest import ROOT, subprocess_env
from test_cli import assert_user_error, run
from test_likelihood import ELBO

TINY = str(ROOT / "configs" / "tiny.yaml")
RUN = ["train.max_steps=300", "train.save_every=10", "train.log_every=1", "train.eval_every=100",
       "model.dropout=0.1", "model.self_condition=true"]  # dropout and the self-conditioning coin use RNGs too


def logged(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def kill_after_first_checkpoint(out, extra):
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "difflm.cli", "train", "--config", TINY, f"train.out_dir={out}",
                             *RUN, *extra, "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # only a safety net: a loaded machine took over 120 s to start and save
    while not (out / "checkpoint" / "trainer_state.pt").is_file():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 15 minutes"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


LIKELIHOOD = [*(f"{k}={v}" for k, v in ELBO.items()), "train.embedding_lr=1e-2", "train.schedule_lr=1e-2",
              "train.posterior_warmup_steps=200"]  # the posterior's weight, a function of the step, resumes too


@pytest.mark.parametrize("extra", [["train.engine=torch"], LIKELIHOOD, ["train.engine=deepspeed"],
                                   ["train.engine=deepspeed", "train.zero_stage=3"]],
                         ids=["torch", "elbo", "zero0", "zero3"])
def test_resume_after_sigkill_follows_the_uninterrupted_run(tmp_path, extra):
    train(load_config(TINY, [f"train.out_dir={tmp_path / 'straight'}", *RUN, *extra]), show_progress=False)
    straight = logged(tmp_path / "straight")
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(killed, extra)
    resumed = train(load_config(TINY, [f"train.out_dir={killed}", *RUN, *extra]), show_progress=False, resume=True)
    after = logged(killed)
    assert resumed.steps == 300 and sorted(after) == list(range(1, 301))
    assert after == pytest.approx(straight, rel=1e-6, abs=0)  # step by step, before and after the kill


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config", TINY, f"train.out_dir={out}", "train.max_steps=10", "--resume"]
    assert_user_error(capsys, base, "nothing to resume")
    train(load_config(TINY, [f"train.out_dir={out}", "train.max_steps=10"]), show_progress=False)
    capsys.readouterr()
    assert_user_error(capsys, base[:-1] + ["train.lr=0.5", "--resume"], "these differ: train.lr")
    code, _, err = run(capsys, *base[:-1], "train.threads=1", "train.max_minutes=5", "--no-progress", "--resume")
    assert code == 0 and "already complete (10 of 10 steps)" in err, err  # the machine's threads may change
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a truncated file
    assert_user_error(capsys, base, "is corrupt or partial")
    state.unlink()
    assert_user_error(capsys, base, "nothing to resume")


@pytest.mark.parametrize("stage,stop", [(2, "time"), (3, "SIGTERM")])
def test_two_process_deepspeed_resume_follows_the_uninterrupted_run(tmp_path, stage, stop):
    """Under torchrun: a run stopped early, by its time limit or by SIGTERM to the launcher (which passes it on to
    every rank), saves one checkpoint from a step all ranks agreed on; resumed with --resume it logs the same losses
    as one never stopped; each rank's data position and RNGs come back from its own file."""
    import socket

    def torchrun(out, *extra, signal_after_steps=None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(port), "-m", "difflm.cli", "train", "--config", TINY,
                                 f"train.out_dir={out}", "train.engine=deepspeed", f"train.zero_stage={stage}",
                                 "train.max_steps=30", "train.save_every=10", "train.log_every=1",
                                 "train.eval_every=15", "model.dropout=0.1", *extra, "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(threads=1))
        if signal_after_steps:
            deadline = time.time() + 240
            while not ((out / "metrics.jsonl").is_file()
                       and len((out / "metrics.jsonl").read_text().splitlines()) >= signal_after_steps):
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err

    code, err = torchrun(tmp_path / "straight")
    assert code == 0, err[-3000:]
    stopped = tmp_path / "stopped"
    if stop == "time":
        code, err = torchrun(stopped, "train.max_minutes=0.00001")  # stops after its first step, saving a checkpoint
        assert code == 0, err[-3000:]
    else:
        code, err = torchrun(stopped, signal_after_steps=2)
        assert code != 0 and "difflm: stopped by SIGTERM at step" in err and "--resume" in err, err[-3000:]
    first = sorted(logged(stopped))
    assert first and first[-1] < 30 and sorted(p.name for p in (stopped / "checkpoint").iterdir()) == [
        "engine", "rank0.pt", "rank1.pt", "trainer_state.pt"]
    code, err = torchrun(stopped, "--resume")
    assert code == 0, err[-3000:]
    assert logged(stopped) == pytest.approx(logged(tmp_path / "straight"), rel=1e-6, abs=0)
