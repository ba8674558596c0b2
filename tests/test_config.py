"""Config loading: unknown keys, type coercion, overrides, and every shipped config."""

from pathlib import Path

import pytest

from difflm.config import Config, load_config, save_config
from difflm.errors import DifflmError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(str(path))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_yaml_scientific_notation_becomes_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n  max_steps: 1e3\n")
    cfg = load_config(str(p))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.max_steps == 1000


def test_overrides_are_coerced():
    cfg = load_config(None, ["train.lr=3e-4", "data.lowercase=true", "model.num_layers=2", "data.source=x.csv"])
    assert (cfg.train.lr, cfg.data.lowercase, cfg.model.num_layers, cfg.data.source) == (3e-4, True, 2, "x.csv")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(DifflmError, match="did you mean 'batch_size'"):
        load_config(None, ["train.batchsize=3"])
    with pytest.raises(DifflmError, match="unknown config key 'trian'"):
        load_config(None, ["trian.lr=3"])


def test_wrong_type_is_named():
    with pytest.raises(DifflmError, match="train.max_steps must be int, got 'many'"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(DifflmError, match="must be int"):
        load_config(None, ["train.max_steps=2.5"])
    with pytest.raises(DifflmError, match="must look like"):
        load_config(None, ["train.max_steps"])


def test_defaults():
    assert load_config() == Config()
