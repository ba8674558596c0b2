"""Model cards, training curves and `difflm info`: what a saved model says about itself."""

import importlib.util
import json
import shutil

import pytest
import yaml

from difflm.card import CARD, add_section, data_facts, new_card, read_card
from difflm.config import load_config

from conftest import ROOT, metric_values
from test_cli import assert_user_error, run

TINY = str(ROOT / "configs" / "tiny.yaml")


def card_meta(model_dir):
    text = (model_dir / CARD).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_facts_match_the_config(tiny_run):
    cfg = load_config(TINY, [f"train.out_dir={tiny_run}"])
    meta = card_meta(tiny_run / "model")
    assert meta["library_name"] == "difflm" and meta["pipeline_tag"] == "text-generation"
    assert "difflm" in meta["tags"] and "datasets" not in meta  # builtin data has no Hub id
    facts = meta["difflm"]
    arch, data, tr = facts["architecture"], facts["data"], facts["training"]
    for key in ("embed_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size", "self_condition",
                "output", "embedding_norm", "mse_weight", "ce_weight", "time_input",
                "self_condition_rows", "zero_init_output", "denoiser"):
        assert arch[key] == getattr(cfg.model, key), key
    for key in ("schedule", "num_steps", "prediction", "time_warp_bins", "noise_scale", "log_snr_max_floor"):
        assert arch[key] == getattr(cfg.diffusion, key), key
    assert arch["seq_len"] == cfg.data.seq_len and arch["vocab_size"] == data["vocabulary"]
    assert data["source"] == "builtin:restaurants" and data["train_texts"] == cfg.data.builtin_train
    assert data["dev_texts"] == cfg.data.builtin_dev and data["truncated_train"] == 0
    assert tr["steps"] == cfg.train.max_steps and tr["batch_size"] == cfg.train.batch_size
    assert tr["examples_seen"] == cfg.train.max_steps * cfg.train.batch_size
    assert tr["final_dev_loss_ema"] == pytest.approx(metric_values(tiny_run, "dev_loss_ema")[-1], abs=1e-6)
    assert tr["device"].startswith("cpu") and tr["wall_time_s"] > 0
    from difflm.text import load_model

    assert facts["parameters"] == sum(p.numel() for p in load_model(tiny_run / "model")[0].parameters())
    body = (tiny_run / "model" / CARD).read_text()
    assert "## Training data" in body and "load_model(" in body and str(tiny_run / "model") in body


def test_hub_sources_name_their_dataset_and_license(tiny_run):
    from difflm.text import load_model

    model, _ = load_model(tiny_run / "model")
    cfg = load_config(TINY, ["data.source=tuetschek/e2e_nlg", "data.text_column=human_reference"])
    meta = yaml.safe_load(new_card("diffusion", model, data_facts(cfg, {"train_texts": 1}), {}).split("---\n")[1])
    assert meta["datasets"] == ["tuetschek/e2e_nlg"] and meta["license"] == "cc-by-sa-4.0"
    local = load_config(TINY, [f"data.source={TINY}"])  # an existing file is no Hub id
    meta = yaml.safe_load(new_card("diffusion", model, data_facts(local, {}), {}).split("---\n")[1])
    assert "datasets" not in meta and "license" not in meta


def test_eval_adds_its_figures_and_keeps_the_rest(tiny_run, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_run / "model", model_dir)
    with open(model_dir / CARD, "a") as f:
        f.write("\nA note written by hand.\n")
    added = ("evaluation", "control")  # what other tests' eval runs may have added to the shared run's card
    before = {k: v for k, v in card_meta(model_dir)["difflm"].items() if k not in added}
    for seed in ("0", "1"):
        code, _, err = run(capsys, "eval", "--model", str(model_dir), "--out", str(tmp_path / f"ev{seed}"),
                           "--metrics", "diversity", "--num-samples", "6", "--steps", "5", "--seed", seed,
                           "--no-progress")
        assert code == 0, err
        text = (model_dir / CARD).read_text()
        assert text.count("<!-- difflm:evaluation -->") == 1 and "A note written by hand." in text
        facts = card_meta(model_dir)["difflm"]
        assert {k: v for k, v in facts.items() if k not in added} == before  # the training facts kept
        report = json.loads((tmp_path / f"ev{seed}" / "metrics.json").read_text())["metrics"]
        assert facts["evaluation"]["diversity"] == report["diversity"]  # this run's figures replace the last
        assert f"| diversity.distinct_2 | {report['diversity']['distinct_2']:.4g} |" in text
    add_section(model_dir, "control", "Controllable generation", {"content": {"success": {"content": 0.5}}})
    meta, body = read_card(model_dir)
    assert meta["difflm"]["control"]["content"]["success"]["content"] == 0.5 and "<!-- difflm:evaluation" in body


def test_training_png_is_a_valid_image(tiny_run):
    import matplotlib.image

    png = tiny_run / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(png).shape
    assert h > 300 and w > 600
    assert not list(tiny_run.glob(".training.png.*"))  # written atomically


def test_info_prints_the_card_and_refuses_other_directories(tiny_run, tmp_path, capsys):
    code, out, err = run(capsys, "info", "--model", str(tiny_run))
    assert code == 0, err
    assert out.startswith("Text diffusion model: ") and "  embed_dim: 8\n" in out and "  steps: 30\n" in out
    assert "objective: x0-prediction" in out and "training:\n" in out
    assert_user_error(capsys, ["info", "--model", str(tmp_path)], "has no difflm model card")
    assert_user_error(capsys, ["info", "--model", str(tmp_path / "none")], "does not exist")
    (tmp_path / CARD).write_text("---\nlicense: mit\n---\n# someone else's model\n")
    assert_user_error(capsys, ["info", "--model", str(tmp_path)], "is not a difflm model card")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_tensorboard_event_files(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={out}", "train.max_steps=10",
                       "train.eval_every=5", "train.tensorboard=true", "--no-progress")
    assert code == 0, err
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"loss", "dev_loss", "dev_loss_ema", "lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [5, 10]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(metric_values(out, "loss"), rel=1e-6)


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "tb"
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={out}", "train.tensorboard=true"],
                      "pip install 'difflm[tensorboard]'", out_dir=out)
    assert not out.exists()


def test_the_summary_names_the_denoiser_blocks():
    from difflm.card import architecture, summary
    from difflm.modeling import TextDiffusionConfig

    plain = summary("diffusion", architecture(TextDiffusionConfig()))
    assert "pre-LN" not in plain
    assert "pre-LN blocks" in summary("diffusion", architecture(TextDiffusionConfig(denoiser="prenorm")))


def test_loading_an_unfinished_run_warns(tiny_run, tmp_path, caplog, capsys):
    """A run's model/ is rewritten at every save_every: a model saved before max_steps says so when loaded."""
    from difflm.text import load_model

    with caplog.at_level("WARNING", logger="difflm"):
        load_model(tiny_run / "model")
    assert "was saved at step" not in caplog.text
    partial = tmp_path / "model"
    shutil.copytree(tiny_run / "model", partial)
    steps = card_meta(partial)["difflm"]["training"]["max_steps"]
    card = (partial / CARD).read_text()
    (partial / CARD).write_text(card.replace(f"\n    steps: {steps}\n", "\n    steps: 1\n", 1))
    with caplog.at_level("WARNING", logger="difflm"):
        load_model(partial)
    assert f"was saved at step 1 of {steps}" in caplog.text
    # a teacher reads only the run's tokenizer and length, which an unfinished run already has: no warning
    capsys.readouterr()  # what the loads above printed
    code, _, err = run(capsys, "train-teacher", "--model", str(partial), f"teacher.out_dir={tmp_path / 'teacher'}",
                       "teacher.max_steps=2", "teacher.eval_every=2", "--no-progress")
    assert code == 0 and "teacher trained" in err and "was saved at step" not in err
