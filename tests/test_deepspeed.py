"""The DeepSpeed engine on CPU (one process, gloo): ZeRO 0-2 runs, equality with plain PyTorch, config checks."""

import json

import pytest

from difflm.cli import main
from difflm.config import load_config
from difflm.engines import deepspeed_config, merge_user_config
from difflm.errors import DifflmError
from difflm.train import train

from conftest import ROOT, metric_values, subprocess_env
from test_cli import assert_user_error

TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = ["train.max_steps=12", "train.eval_every=6", "train.log_every=1"]


def test_zero0_matches_plain_pytorch_step_for_step(tmp_path):
    """Same seed, same data, same AdamW and schedule: ZeRO-0 reproduces the torch engine's losses to 1e-5."""
    for engine in ("torch", "deepspeed"):
        train(load_config(TINY, [f"train.out_dir={tmp_path / engine}", f"train.engine={engine}", *STEPS]),
              show_progress=False)
    torch_losses, ds_losses = metric_values(tmp_path / "torch"), metric_values(tmp_path / "deepspeed")
    assert len(torch_losses) == 12
    assert ds_losses == pytest.approx(torch_losses, rel=1e-5, abs=1e-6)


def test_zero3_partitions_yet_matches_zero0_and_exports_full_weights(tmp_path):
    """ZeRO-3 partitions the weights (the tied rounding head is gathered as an external parameter); its losses,
    EMA and exported model match ZeRO-0's, and the export loads on a single CPU. torch's own linear stays in
    place for the rest of the process (DeepSpeed's default would swap in its own for good)."""
    import torch
    from safetensors.torch import load_file

    linear = torch.nn.functional.linear
    for stage in (0, 3):
        train(load_config(TINY, [f"train.out_dir={tmp_path / str(stage)}", "train.engine=deepspeed",
                                 f"train.zero_stage={stage}", *STEPS]), show_progress=False)
    assert torch.nn.functional.linear is linear
    assert metric_values(tmp_path / "3") == pytest.approx(metric_values(tmp_path / "0"), rel=1e-4, abs=1e-6)
    ema0 = load_file(tmp_path / "0" / "model" / "model.safetensors")
    ema3 = load_file(tmp_path / "3" / "model" / "model.safetensors")
    assert ema0.keys() == ema3.keys() and all(ema3[k].numel() == ema0[k].numel() for k in ema0)
    for k in ema0:
        torch.testing.assert_close(ema3[k], ema0[k], rtol=1e-4, atol=1e-5)
    raw = torch.load(tmp_path / "3" / "checkpoint" / "trainer_state.pt", weights_only=False)["model"]
    assert all(v.numel() > 0 for v in raw.values())  # gathered, not the empty partitions


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train_and_save_a_loadable_model(tmp_path, stage):
    from difflm.text import generate, load_model

    result = train(load_config(TINY, [f"train.out_dir={tmp_path}", "train.engine=deepspeed",
                                      f"train.zero_stage={stage}", *STEPS]), show_progress=False)
    model, tok = load_model(result.model_dir)
    assert len(generate(model, tok, 2, steps=5)) == 2
    assert all(l == l for l in metric_values(tmp_path))  # finite, logged every step


@pytest.mark.parametrize("offload", [["train.zero_stage=2", "train.offload_optimizer=true"],
                                     ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]])
def test_offloaded_runs_follow_zero0(tmp_path, offload):
    """Optimizer state (and ZeRO-3 parameters) in CPU memory: torch's AdamW steps there (DeepSpeed's own CPU Adam
    would need a JIT build), with the same losses as ZeRO-0."""
    for name, extra in (("zero0", []), ("offload", offload)):
        train(load_config(TINY, [f"train.out_dir={tmp_path / name}", "train.engine=deepspeed", *STEPS, *extra]),
              show_progress=False)
    assert metric_values(tmp_path / "offload") == pytest.approx(metric_values(tmp_path / "zero0"), rel=1e-5)


def test_launcher_local_rank_argument_is_accepted(tmp_path, capsys):
    code = main(["train", "--config", TINY, f"train.out_dir={tmp_path}", "train.engine=deepspeed", *STEPS,
                 "--no-progress", "--local_rank=0"])
    assert code == 0, capsys.readouterr().err


def test_generated_config_follows_the_training_config():
    cfg = load_config(TINY, ["train.engine=deepspeed", "train.zero_stage=2", "train.grad_accum=4",
                             "train.offload_optimizer=true", "train.grad_clip=0.5"]).train
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW on the offloaded state, no JIT build


def test_user_json_adds_keys_and_contradictions_are_named(tmp_path):
    ds = deepspeed_config(load_config(TINY).train)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "communication_data_type": "fp32"}))
    merged = merge_user_config(ds, str(extra))
    assert merged["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000}
    assert merged["communication_data_type"] == "fp32"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(DifflmError, match=r"train_micro_batch_size_per_gpu=8 \(training config: 16\); "
                                          r"zero_optimization.stage=2 \(training config: 0\)"):
        merge_user_config(ds, str(bad))


@pytest.mark.parametrize("override,message", [
    ("train.zero_stage=7", "train.zero_stage must be in [0, 3], got 7"),
    ("train.offload_params=true", "train.offload_params needs train.zero_stage 3"),
    ("train.offload_optimizer=true", "train.offload_optimizer needs train.zero_stage 1, 2 or 3"),
    ("train.precision=bf16", "bf16 needs a CUDA GPU"),
    ("train.precision=int4", "train.precision 'int4' is unknown"),
])
def test_deepspeed_bad_inputs(tmp_path, capsys, override, message):
    if "bf16" in override:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is here: bf16 is supported")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "train.engine=deepspeed",
                               override], message)


def test_contradicting_json_and_torch_engine_options_fail_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_clipping": 5.0}))
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "train.engine=deepspeed",
                               f"train.deepspeed_config={bad}"], "gradient_clipping=5.0 (training config: 1.0)")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "train.precision=fp16"],
                      "apply to train.engine=deepspeed")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "train.cast_weights=true"],
                      "apply to train.engine=deepspeed")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "train.engine=deepspeed",
                               "train.zero_stage=3", "train.compile=true"], "train.compile does not work with ZeRO-3")
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", "train.engine=deepspeed",
                               "train.cast_weights=true"], "train.cast_weights needs train.precision=bf16 or fp16")


def test_two_processes_with_torchrun_and_gloo(tmp_path):
    """Data-parallel DeepSpeed over two CPU processes, ZeRO-0 and ZeRO-3: both finish, rank 0 alone writes the
    model, and ZeRO-3 (weights partitioned across the two ranks, the tied embedding gathered as an external
    parameter) follows ZeRO-0's losses and exports the same full EMA weights."""
    import socket
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from difflm.text import load_model

    for stage in (0, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), "-m", "difflm.cli", "train", "--config", TINY,
                               f"train.out_dir={tmp_path / str(stage)}", "train.engine=deepspeed",
                               f"train.zero_stage={stage}", "train.max_steps=6", "train.eval_every=3",
                               "train.log_every=1", "--no-progress"],
                              capture_output=True, text=True, env=subprocess_env(threads=1), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stderr.count("micro-batch 16 x accumulation 1 x 2 processes") == 1  # rank 0 logs, rank 1 not
        assert len(metric_values(tmp_path / str(stage))) == 6
    assert metric_values(tmp_path / "3") == pytest.approx(metric_values(tmp_path / "0"), rel=1e-5)
    model, _ = load_model(tmp_path / "3" / "model")  # loads on one CPU
    assert model.denoiser.encoder.layer[0].output.dense.weight.numel() > 0
    ema0, ema3 = (load_file(tmp_path / s / "model" / "model.safetensors") for s in ("0", "3"))
    for k in ema0:
        torch.testing.assert_close(ema3[k], ema0[k], rtol=1e-4, atol=1e-5)
