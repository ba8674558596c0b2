"""`difflm bench`: training and sampling throughput of Diffusion-LM's recipe against difflm's fast settings,
measured in one run on one device, printed as a table with the ratio.

Training (a) the recipe: fp32, eager attention, batch 64, AdamW; (b) the fast default: bf16 autocast (on CUDA),
SDPA attention, fused AdamW (on CUDA), torch.compile (on CUDA), a larger batch. Sampling: the recipe's
fp32 batch 50 with 2000 ancestral steps against bf16, a large batch and DDIM at 200 and 50 steps; its sequences/s
come from the measured time of one denoiser call times the number of steps (the sampler's cost is its calls).
On a CPU the same command runs on the config's (small) model; there only the ratios mean anything.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import List, Optional

import torch

from .config import Config
from .engines import DeepSpeedEngine, TorchEngine
from .modeling import TextDiffusionConfig, TextDiffusionModel
from .text import TextObjective
from .train import BatchStream, dev_loss, model_config


@dataclass(frozen=True)
class Variant:
    name: str
    batch: int
    bf16: bool
    attention: str  # eager or sdpa
    compile: bool
    fused: bool


@dataclass
class Row:
    variant: Variant
    seconds_per_step: float
    sequences_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: Optional[float]
    peak_memory_gb: Optional[float]


def train_flops_per_sequence(mcfg: TextDiffusionConfig) -> float:
    """6 x (matmul parameters) per token for forward and backward, plus attention's 12 x layers x width x length
    (the usual model-FLOPs count, Chinchilla appendix F; embeddings and norms left out)."""
    h, f, n, length = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_layers, mcfg.seq_len
    per_layer = 4 * h * h + 2 * h * f
    proj = 2 * h * h + 2 * mcfg.embed_dim * h + 2 * h * h  # input/output projections and time MLP (roughly)
    return length * (6 * (n * per_layer + proj) + 12 * n * h * length)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, bf16: bool, size: int = 4096, repeats: int = 20) -> float:
    """Measured matrix-multiply FLOP/s of the device (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if device.type == "cpu":
        size, repeats = 1024, 5
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def _autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def time_training(cfg: Config, vocab: int, variant: Variant, device: torch.device, steps: int,
                  warmup: int, peak: float, zero_stage: Optional[int] = None, checkpointing: bool = False) -> Row:
    """Time `steps` training steps of `variant`; `zero_stage` runs them through the DeepSpeed engine instead
    (bf16 then is DeepSpeed's own mode); `checkpointing` recomputes the denoiser's activations in backward."""
    torch.manual_seed(0)
    mcfg = model_config(cfg, vocab, attention=variant.attention)
    model = TextDiffusionModel(mcfg).to(device).train()
    if checkpointing:
        model.denoiser.gradient_checkpointing_enable()
    ids = torch.randint(0, vocab, (variant.batch, mcfg.seq_len), device=device)
    train_cfg = replace(cfg.train, batch_size=variant.batch, precision="bf16" if variant.bf16 else "fp32",
                        deepspeed_config="")
    # as in training: the loss is one module (ZeRO-3 gathers the tied embedding there); compile wraps the denoiser
    objective = TextObjective(torch.compile(model) if variant.compile else model)
    if zero_stage is None:
        engine = TorchEngine(objective, train_cfg, fused=variant.fused and device.type == "cuda")
    else:
        engine = DeepSpeedEngine(objective, replace(train_cfg, engine="deepspeed", zero_stage=zero_stage))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with engine.autocast():
            loss = objective(ids).loss
        engine.step(loss)

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    sec = (time.perf_counter() - start) / steps
    flops = train_flops_per_sequence(mcfg) * variant.batch / sec
    return Row(variant, sec, variant.batch / sec, variant.batch * mcfg.seq_len / sec, flops / 1e12,
               flops / peak if peak else None,
               torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)


@torch.no_grad()
def time_sampling_call(cfg: Config, vocab: int, batch: int, bf16: bool, attention: str, device, calls: int = 5):
    """Seconds per denoiser call at this batch (what one sampler step costs)."""
    mcfg = model_config(cfg, vocab, attention=attention)
    model = TextDiffusionModel(mcfg).to(device).eval()
    x = torch.randn(batch, mcfg.seq_len, mcfg.embed_dim, device=device)
    t = torch.full((batch,), 0.5, device=device)
    with _autocast(device, bf16):
        model(x, t)
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            model(x, t)
        _sync(device)
    return (time.perf_counter() - start) / calls


def variants(device: torch.device, fast_batch: int) -> List[Variant]:
    cuda = device.type == "cuda"
    recipe = Variant("recipe", 64, bf16=False, attention="eager", compile=False, fused=False)
    return [recipe, Variant("difflm", fast_batch, bf16=cuda, attention="sdpa", compile=cuda, fused=cuda)]


def loss_by_sequences(cfg: Config, device, variant_list: List[Variant], total: int, points: int = 4) -> List[str]:
    """Dev loss against training sequences seen, for each variant, on the embedded grammar corpus (always at hand,
    with no download): whether a larger batch costs quality per sequence seen."""
    from .data import build_tokenizer, encode
    from .grammar import builtin_grammar

    g = builtin_grammar()
    texts, dev_texts = g.corpus(20000, seed=1), g.corpus(512, seed=2)
    tok = build_tokenizer(texts)
    ids, _ = encode(texts, tok, cfg.data.seq_len)
    dev_ids, _ = encode(dev_texts, tok, cfg.data.seq_len)
    ids, dev_ids = ids.to(device), dev_ids.to(device)
    marks = [total * (k + 1) // points for k in range(points)]
    curves = []
    for v in variant_list:
        torch.manual_seed(0)
        model = TextDiffusionModel(model_config(cfg, len(tok), attention=v.attention)).to(device).train()
        train_cfg = replace(cfg.train, batch_size=v.batch, precision="bf16" if v.bf16 else "fp32",
                            max_steps=max(1, total // v.batch))
        engine = TorchEngine(model, train_cfg, fused=v.fused and device.type == "cuda")
        objective, data, seen, curve = TextObjective(torch.compile(model) if v.compile else model), \
            BatchStream(ids, v.batch, 0), 0, []
        for mark in marks:
            while seen < mark:
                with engine.autocast():
                    loss = objective(next(data)).loss
                engine.step(loss)
                seen += v.batch
            curve.append(dev_loss(TextObjective(model), dev_ids, 128, 4))
        curves.append(curve)
    lines = ["| sequences seen | " + " | ".join(f"dev loss, {v.name} (batch {v.batch})" for v in variant_list) + " |",
             "| ---: |" + " ---: |" * len(variant_list)]
    lines += [f"| {mark:,} | " + " | ".join(f"{c[k]:.4f}" for c in curves) + " |" for k, mark in enumerate(marks)]
    return lines + ["", "(embedded grammar corpus; each variant's lr is the config's, its schedule spans the run)", ""]


def run(cfg: Config, vocab: int, device: torch.device, steps: int = 20, warmup: int = 5,
        fast_batch: Optional[int] = None, sample_batch: Optional[int] = None, quality_sequences: int = 0) -> str:
    """Measure and return the printed report (markdown tables)."""
    cuda = device.type == "cuda"
    fast_batch = fast_batch or (512 if cuda else 256)
    sample_batch = sample_batch or (512 if cuda else 256)
    peak = matmul_peak(device, bf16=cuda)
    rows = [time_training(cfg, vocab, v, device, steps, warmup, peak) for v in variants(device, fast_batch)]
    where = torch.cuda.get_device_name(device) if cuda else "CPU (absolute figures are not meaningful: ratios only)"
    lines = [f"device: {where}; measured {'bf16' if cuda else 'fp32'} matmul peak {peak / 1e12:.2f} TFLOP/s; "
             f"model {cfg.model.num_layers} x {cfg.model.hidden_size}, d={cfg.model.embed_dim}, "
             f"length {cfg.data.seq_len}, vocabulary {vocab}", "",
             "| training | batch | bf16 | attention | compile | fused AdamW | ms/step | seq/s | tokens/s | TFLOP/s | MFU | "
             "peak GB |", "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        v = r.variant
        lines.append(f"| {v.name} | {v.batch} | {v.bf16} | {v.attention} | {v.compile} | {v.fused} | "
                     f"{1000 * r.seconds_per_step:.1f} | {r.sequences_per_s:,.0f} | {r.tokens_per_s:,.0f} | "
                     f"{r.tflops:.2f} | {'' if r.mfu is None else f'{100 * r.mfu:.1f}%'} | "
                     f"{'' if r.peak_memory_gb is None else f'{r.peak_memory_gb:.2f}'} |")
    lines += ["", f"training throughput ratio difflm / recipe: {rows[1].sequences_per_s / rows[0].sequences_per_s:.2f}x",
              ""]
    lines += engine_and_length_tables(cfg, vocab, device, steps, warmup, peak, rows[1].variant)
    if quality_sequences:
        lines += loss_by_sequences(cfg, device, [r.variant for r in rows], quality_sequences)
    recipe_call = time_sampling_call(cfg, vocab, 50, False, "eager", device)
    fast_call = time_sampling_call(cfg, vocab, sample_batch, cuda, "sdpa", device)
    recipe_rate = 50 / (2000 * recipe_call)
    lines += ["| sampling | batch | steps | s/call | seq/s | ratio to recipe |", "| --- | ---: | ---: | ---: | ---: | ---: |",
              f"| recipe (fp32, ancestral) | 50 | 2000 | {recipe_call:.4f} | {recipe_rate:.3f} | 1.00x |"]
    for k in (200, 50):
        rate = sample_batch / (k * fast_call)
        lines.append(f"| difflm ({'bf16, ' if cuda else ''}DDIM) | {sample_batch} | {k} | {fast_call:.4f} | "
                     f"{rate:.3f} | {rate / recipe_rate:.1f}x |")
    return "\n".join(lines) + "\n"


def engine_and_length_tables(cfg: Config, vocab: int, device, steps: int, warmup: int, peak: float,
                             fast: Variant) -> List[str]:
    """Plain PyTorch against DeepSpeed ZeRO 1/2/3 at identical settings (no compile: DeepSpeed wraps the module),
    and peak memory at longer sequences with and without activation checkpointing (CUDA only)."""
    base = replace(fast, name="plain", compile=False)
    lines = ["| engine | ms/step | ratio to plain | peak GB |", "| --- | ---: | ---: | ---: |"]
    plain = time_training(cfg, vocab, base, device, steps, warmup, peak)
    lines.append(f"| plain PyTorch | {1000 * plain.seconds_per_step:.1f} | 1.00x | {_gb(plain)} |")
    for stage in (1, 2, 3):
        r = time_training(cfg, vocab, replace(base, name=f"zero{stage}"), device, steps, warmup, peak, zero_stage=stage)
        lines.append(f"| DeepSpeed ZeRO-{stage} | {1000 * r.seconds_per_step:.1f} | "
                     f"{r.seconds_per_step / plain.seconds_per_step:.2f}x | {_gb(r)} |")
    lines.append("")
    if device.type != "cuda":
        return lines + ["(peak memory by sequence length is measured on CUDA only)", ""]
    lines += ["| length | peak GB | peak GB, activation checkpointing |", "| ---: | ---: | ---: |"]
    for length in (64, 256, 1024):
        long_cfg = replace(cfg, data=replace(cfg.data, seq_len=length))
        cells = [_gb(time_training(long_cfg, vocab, base, device, 2, 1, peak, checkpointing=c)) for c in (False, True)]
        lines.append(f"| {length} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def _gb(row: Row) -> str:
    return "" if row.peak_memory_gb is None else f"{row.peak_memory_gb:.2f}"
