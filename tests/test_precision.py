"""What a GPU run relies on, checked on CPU: bf16 in both engines (the CUDA-only check is lifted for these tests;
CPUs compute bf16 too), the diffusion math kept in fp32 when DeepSpeed casts the weights, gradient accumulation,
and a training loop that reads nothing back from the device between log steps."""

import pytest
import torch

from difflm import precision
from difflm.bench import count_host_syncs
from difflm.config import load_config
from difflm.engines import DeepSpeedEngine, TorchEngine
from difflm.image import ImageDiffusionConfig, ImageDiffusionModel, ImageObjective
from difflm.modeling import TextDiffusionConfig, TextDiffusionModel
from difflm.text import text_loss
from difflm.train import train

from conftest import ROOT, metric_values

TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = ["train.max_steps=8", "train.eval_every=4", "train.log_every=1", "train.device=cpu"]


@pytest.fixture
def bf16_here(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda: True)


def run(out, *overrides):
    return train(load_config(TINY, [f"train.out_dir={out}", *STEPS, *overrides]), show_progress=False)


def test_deepspeed_bf16_is_torch_autocast_and_matches_the_torch_engine(tmp_path, bf16_here):
    """DeepSpeed's default bf16 is torch autocast over fp32 weights: the same arithmetic as the torch engine's bf16,
    so ZeRO-0 reproduces its losses; the loss is not rounded to bf16 and differs from fp32 by bf16's precision."""
    run(tmp_path / "torch", "train.precision=bf16")
    run(tmp_path / "ds", "train.precision=bf16", "train.engine=deepspeed")
    run(tmp_path / "fp32")
    bf16, ds, fp32 = metric_values(tmp_path / "torch"), metric_values(tmp_path / "ds"), metric_values(tmp_path / "fp32")
    assert ds == pytest.approx(bf16, rel=1e-5)
    assert bf16[0] == pytest.approx(fp32[0], rel=2e-2) and bf16[0] != fp32[0]
    assert any(torch.tensor(v, dtype=torch.bfloat16).item() != v for v in bf16)  # computed in fp32, not bf16


def test_cast_weights_keeps_the_diffusion_math_in_fp32(tmp_path, bf16_here, monkeypatch):
    """With train.cast_weights DeepSpeed stores the weights in bf16. The times and noise levels must stay fp32:
    in bf16, t = i/T would round (i = 1537 of 2000 becomes 1536) and so would alpha_bar."""
    from difflm.diffusion import GaussianDiffusion

    seen = []
    denoise = GaussianDiffusion.denoise

    def spy(self, model_fn, x0, t, noise):
        out = denoise(self, model_fn, x0, t, noise)
        seen.append((x0.dtype, t.dtype, out.x0_hat.dtype, (t * self.num_steps).frac().abs().max().item()))
        return out

    monkeypatch.setattr(GaussianDiffusion, "denoise", spy)
    result = run(tmp_path, "train.precision=bf16", "train.engine=deepspeed", "train.cast_weights=true",
                 "diffusion.num_steps=2000")
    train_calls = seen[:3]
    assert all(s[:3] == (torch.float32,) * 3 and s[3] < 1e-3 for s in train_calls), train_calls
    assert all(v == v for v in metric_values(tmp_path))
    from safetensors.torch import load_file

    ema = load_file(result.model_dir / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in ema.values())  # the EMA average is kept in fp32


def test_text_loss_of_a_bf16_model_is_fp32_and_close_to_the_fp32_loss():
    torch.manual_seed(0)
    model = TextDiffusionModel(TextDiffusionConfig(vocab_size=30, seq_len=12, embed_dim=8, hidden_size=32,
                                                   num_layers=1, num_heads=2, intermediate_size=64, dropout=0.0,
                                                   num_steps=2000, self_condition=True))
    ids = torch.randint(0, 30, (64, 12))
    full = text_loss(model, ids, torch.Generator().manual_seed(1))
    half = text_loss(model.to(torch.bfloat16), ids, torch.Generator().manual_seed(1))
    assert half.loss.dtype == torch.float32
    assert half.loss.item() == pytest.approx(full.loss.item(), rel=0.03)
    assert model(torch.randn(2, 12, 8), torch.rand(2)).dtype == torch.float32  # output in the latents' dtype


def test_image_model_with_bf16_weights_trains_in_fp32_latents():
    torch.manual_seed(0)
    model = ImageDiffusionModel(ImageDiffusionConfig(channels=1, image_size=8, base_channels=8, channel_mults=[1, 2],
                                                     res_blocks=1, num_steps=100)).to(torch.bfloat16)
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert out.dtype == torch.float32
    loss = ImageObjective(model)(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


class Quadratic(torch.nn.Module):
    """A loss whose gradient depends on the whole batch: mean over rows of (w . x - y)^2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, 4))

    def forward(self, x, y):
        return ((x @ self.w - y) ** 2).mean()


@pytest.mark.parametrize("engine,stage", [("torch", 0), ("deepspeed", 0), ("deepspeed", 2)])
def test_accumulating_micro_batches_equals_one_large_batch(engine, stage):
    """Two micro-batches of 8 under grad_accum=2 make the same update as one batch of 16, clipping included."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16)
    weights = []
    for accum, batch in ((1, 16), (2, 8)):
        cfg = load_config(TINY, [f"train.engine={engine}", f"train.zero_stage={stage}", f"train.grad_accum={accum}",
                                 f"train.batch_size={batch}", "train.grad_clip=0.5", "train.lr=0.1",
                                 "train.max_steps=10"]).train
        model = Quadratic()
        eng = TorchEngine(model, cfg) if engine == "torch" else DeepSpeedEngine(model, cfg)
        norms = [eng.step(model(x[i: i + batch], y[i: i + batch])) for i in range(0, 16, batch)]
        assert norms[-1] is not None and all(n is None for n in norms[:-1])  # an update at the last micro-batch
        weights.append((eng.model.w.detach().clone(), float(norms[-1])))
    torch.testing.assert_close(weights[1][0], weights[0][0], rtol=1e-6, atol=1e-7)
    assert weights[1][1] == pytest.approx(weights[0][1], rel=1e-5)


def test_a_step_is_one_update_over_grad_accum_micro_batches(tmp_path):
    """max_steps counts optimizer updates: with grad_accum=3 the schedule still ends at zero on the last step."""
    run(tmp_path, "train.engine=deepspeed", "train.grad_accum=3", "train.warmup_steps=0")
    assert metric_values(tmp_path, "step") == list(range(1, 9))
    lrs = metric_values(tmp_path, "lr")
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[0] == pytest.approx(1e-3 * 7 / 8)






@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_the_loop_reads_nothing_back_between_log_steps(tmp_path, engine):
    """Runs of 4 and 12 steps that log, evaluate and save only at their end make the same number of host reads:
    none per step (the loss's health, its parts and the gradient norm stay on the device until logged)."""
    counts = []
    for steps in (4, 12):
        cfg = load_config(TINY, [f"train.out_dir={tmp_path / str(steps)}", f"train.engine={engine}",
                                 f"train.max_steps={steps}", "train.log_every=100", "train.eval_every=100",
                                 "train.save_every=100", "train.max_minutes=60"])
        counts.append(count_host_syncs(lambda: train(cfg, show_progress=False), torch.device("cpu")))
    assert counts[0] == counts[1], counts


def test_a_nan_loss_is_reported_with_its_step_and_nothing_is_saved(tmp_path):
    from difflm.errors import DifflmError

    with pytest.raises(DifflmError, match=r"NaN or infinite at step \d+;"):
        run(tmp_path, "train.lr=1e30", "train.grad_clip=0", "train.log_every=5", "train.save_every=5")
    assert not (tmp_path / "checkpoint").exists()


def test_compiled_denoiser_under_zero2_matches_the_eager_torch_engine(tmp_path):
    """train.compile now also works with DeepSpeed (ZeRO 0-2): the compiled run follows the eager one."""
    run(tmp_path / "eager")
    run(tmp_path / "compiled", "train.engine=deepspeed", "train.zero_stage=2", "train.compile=true")
    assert metric_values(tmp_path / "compiled") == pytest.approx(metric_values(tmp_path / "eager"), rel=1e-4)


def deepspeed_fp16_answer(monkeypatch, supported: bool) -> None:
    """Lift difflm's CUDA-only check for fp16 and make DeepSpeed's device check (on a CPU: does oneDNN have fp16
    kernels? true on some x86 CPUs, false on others) give `supported`."""
    from deepspeed.accelerator import get_accelerator

    from difflm import engines

    monkeypatch.setattr(engines, "check_precision", lambda name, option: None)
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: supported)


def test_fp16_where_deepspeed_finds_no_fp16_is_a_one_line_error(tmp_path, monkeypatch):
    """A device without fp16 (here any CPU, told so) is refused before anything is written, not with DeepSpeed's
    'Type fp16 is not supported on your device' traceback."""
    from difflm.errors import DifflmError

    deepspeed_fp16_answer(monkeypatch, supported=False)
    with pytest.raises(DifflmError, match="no fp16 support on this device; use bf16 or fp32"):
        run(tmp_path / "o", "train.engine=deepspeed", "train.precision=fp16")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_uses_deepspeeds_loss_scaling_and_clips_the_true_gradient(tmp_path, monkeypatch, stage):
    """fp16 runs in DeepSpeed's own fp16 mode: the gradient norm it clips and logs is the unscaled one (as in
    fp32), not x65536 as under its torch-autocast fp16 with ZeRO-1/2. Runs on every x86 CPU: oneDNN is switched off,
    so the fp16 arithmetic goes through torch's own kernels (which every CPU has) and DeepSpeed is told fp16 is
    there."""
    deepspeed_fp16_answer(monkeypatch, supported=True)
    with torch.backends.mkldnn.flags(enabled=False):
        run(tmp_path / "fp16", "train.engine=deepspeed", "train.precision=fp16", f"train.zero_stage={stage}")
    run(tmp_path / "fp32", "train.engine=deepspeed", f"train.zero_stage={stage}")
    fp16, fp32 = metric_values(tmp_path / "fp16", "grad_norm"), metric_values(tmp_path / "fp32", "grad_norm")
    assert fp16[0] == pytest.approx(fp32[0], rel=0.05)
    assert metric_values(tmp_path / "fp16") == pytest.approx(metric_values(tmp_path / "fp32"), rel=0.02)
