"""Config loading: unknown keys, type coercion, overrides, and every shipped config."""

from dataclasses import replace
from pathlib import Path

import pytest

from difflm.config import Config, load_config, save_config
from difflm.errors import DifflmError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(str(path))
    save_config(cfg, tmp_path / "c.yaml")
    loaded = load_config(str(tmp_path / "c.yaml"))
    for key in ("source", "dev_source"):  # local data files are saved as absolute paths, naming the same files
        ours, theirs = getattr(cfg.data, key), getattr(loaded.data, key)
        if ours and Path(ours).exists():
            assert Path(theirs).is_absolute() and Path(theirs) == Path(ours).resolve()
            loaded = replace(loaded, data=replace(loaded.data, **{key: ours}))
    assert loaded == cfg


def test_yaml_scientific_notation_becomes_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n  max_steps: 1e3\n")
    cfg = load_config(str(p))
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.max_steps == 1000


def test_overrides_are_coerced():
    cfg = load_config(None, ["train.lr=3e-4", "data.lowercase=true", "model.num_layers=2", "data.source=x.csv"])
    assert (cfg.train.lr, cfg.data.lowercase, cfg.model.num_layers, cfg.data.source) == (3e-4, True, 2, "x.csv")


def test_unknown_key_suggests_the_closest():
    with pytest.raises(DifflmError, match="unknown config key 'train.batchsize'; did you mean 'batch_size'"):
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


def _numeric_fields():
    import dataclasses
    import typing

    for section in dataclasses.fields(Config):
        cls = section.type if isinstance(section.type, type) else typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                yield section.name, cls, f.name, hints[f.name]


def _outside(rng, typ):
    """Values just outside a range (and the non-finite floats)."""
    step = 1 if typ is int else 1e-3
    values = [] if typ is int else ["nan", "inf", "-inf"]
    if rng.low != float("-inf"):
        values.append(rng.low if rng.low_open else rng.low - step)
    if rng.high != float("inf"):
        values.append(rng.high if rng.high_open else rng.high + step)
    return values


def test_every_numeric_field_has_a_range_and_values_outside_it_are_refused():
    """Walk every int and float field of every section: each has a range, and a value just outside it (or a
    non-finite float) is refused with the key's name, before anything else runs."""
    fields = list(_numeric_fields())
    assert len(fields) > 50
    for section, cls, name, typ in fields:
        rng = cls.range_of(name)
        assert rng is not None, f"{section}.{name} has no range"
        assert rng.holds(getattr(cls(), name)), f"the default of {section}.{name} is outside its range"
        bad = _outside(rng, typ)
        assert bad, f"{section}.{name}: a range with no limit refuses nothing"
        for value in bad:
            with pytest.raises(DifflmError, match=rf"config key {section}\.{name} must be .*, got"):
                load_config(None, [f"{section}.{name}={value}"])


def test_sections_built_in_python_are_checked_too():
    from difflm.config import ModelConfig, TrainConfig

    with pytest.raises(DifflmError, match="train.lr must be positive"):
        TrainConfig(lr=-1.0)
    with pytest.raises(DifflmError, match="model.hidden_size .* divisible by model.num_heads"):
        ModelConfig(hidden_size=30, num_heads=4)
