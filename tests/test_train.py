"""The training loop's parts: LR schedule, EMA, time budget, determinism, devices."""

import json
import logging

import pytest
import torch

from difflm.config import TrainConfig, load_config
from difflm.errors import DifflmError
from difflm.engines import lr_factor
from difflm.runtime import resolve_device
from difflm.train import EMA, BatchStream, train

from conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_lr_warms_up_then_decays_to_zero():
    cfg = TrainConfig(warmup_steps=10, max_steps=110)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5) and lr_factor(110, cfg) == 0.0


def test_adam_beta2_reaches_the_optimizer():
    """(Values outside (0, 1) are refused by test_config's walk over every numeric field's range.)"""
    from difflm.engines import TorchEngine

    model = torch.nn.Linear(2, 2)
    for beta2 in (0.999, 0.99):
        eng = TorchEngine(model, TrainConfig(adam_beta2=beta2), fused=False)
        assert [g["betas"] for g in eng.optimizer.param_groups] == [(0.9, beta2)]


def test_ema_warm_up_and_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # decay min(0.9, 1/10) = 0.1
    assert ema.model.weight.item() == pytest.approx(0.9)
    ema.update(model, step=1000)  # decay 0.9
    assert ema.model.weight.item() == pytest.approx(0.9 + 0.1 * 0.1)
    assert not ema.model.weight.requires_grad
    none = EMA(model, decay=0.0)  # train.ema_decay=0: the saved model is the final weights themselves, exactly
    with torch.no_grad():
        model.weight.fill_(1.0 / 3.0)
    none.update(model, step=5)
    assert torch.equal(none.model.weight, model.weight)


def test_same_seed_same_run_and_time_budget_stops_with_a_checkpoint(tmp_path, caplog):
    runs = []
    for name in ("a", "b"):
        cfg = load_config(TINY, [f"train.out_dir={tmp_path / name}", "train.max_steps=10", "train.eval_every=5"])
        train(cfg, show_progress=False)
        runs.append([json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert [r["loss"] for r in runs[0] if "loss" in r] == [r["loss"] for r in runs[1] if "loss" in r]
    cfg = load_config(TINY, [f"train.out_dir={tmp_path / 'c'}", "train.max_steps=100000", "train.max_minutes=0.0001"])
    logger = logging.getLogger("difflm")  # the CLI stops propagation to the root logger; listen here directly
    logger.addHandler(caplog.handler)
    try:
        result = train(cfg, show_progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert result.stopped_by_time and result.steps < 100000 and (result.model_dir / "model.safetensors").is_file()
    assert "max_minutes=0.0001 reached" in caplog.text


def test_device_names_are_checked():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(DifflmError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(DifflmError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_unknown_engine_is_rejected(tmp_path):
    with pytest.raises(DifflmError, match="train.engine 'jax'"):
        train(load_config(TINY, [f"train.out_dir={tmp_path}", "train.engine=jax"]), show_progress=False)


def test_batches_cover_each_epoch_once_and_survive_a_tiny_dataset():
    ids = torch.arange(10)[:, None]
    it = BatchStream(ids, 3, seed=0)
    epoch = torch.cat([next(it) for _ in range(3)])[:, 0].tolist()
    assert len(set(epoch)) == 9  # 3 full batches, no repeats; the 10th row waits for the next epoch
    assert next(BatchStream(ids[:2], 5, seed=0)).shape == (2, 1)
    # resuming from a saved state continues the same sequence, across an epoch boundary
    state = it.state_dict()
    expected = [next(it).tolist() for _ in range(4)]
    again = BatchStream(ids, 3, seed=123)
    again.load_state_dict(state)
    assert [next(again).tolist() for _ in range(4)] == expected


def test_saved_configs_name_local_data_absolutely(tmp_path, monkeypatch):
    """A relative data path names a file from where training ran: the run's and the model's saved configs hold it
    absolute, so `eval --model` (held-out text) works from another directory."""
    import yaml

    from difflm.cli import _config_for_model

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.txt").write_text("".join(f"the cat sat on mat {i % 7} .\n" for i in range(40)))
    monkeypatch.chdir(tmp_path / "data")
    train(load_config(TINY, ["train.out_dir=../run", "data.source=t.txt", "data.dev_source=",
                             "train.max_steps=2", "train.eval_every=2"]), show_progress=False)
    absolute = str(tmp_path / "data" / "t.txt")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["source"] == absolute
    monkeypatch.chdir(tmp_path)
    args = type("Args", (), {"config": None, "model": "run", "overrides": []})()
    assert _config_for_model(args).data.source == absolute
