"""`difflm bench`: training and sampling throughput of Diffusion-LM's recipe against difflm's fast settings,
measured in one run on one device, printed table by table as the measurements finish.

Sections (all by default, `--sections` picks some):
- training: (a) the recipe: fp32, eager attention, batch 64; (b) difflm's GPU default: bf16 autocast, SDPA
  attention, fused AdamW, torch.compile, a larger batch. Each step is `difflm train`'s own loop step (loss,
  backward, clipping, AdamW, schedule, EMA), timed after warm-up; MFU is against the measured bf16 matmul peak.
- quality: dev loss against training sequences seen for both, on the embedded grammar corpus, the larger batch
  with its learning rate scaled by the batch ratio (linear scaling; --lr-scale sets another factor) and the
  warm-up over as many sequences: whether the larger batch costs quality per sequence seen.
- engines: plain PyTorch against DeepSpeed ZeRO 0-3 at identical settings (bf16 autocast over fp32 weights on
  a GPU), DeepSpeed's own bf16 mode (train.cast_weights), and ZeRO-2 with torch.compile (GPU).
- memory (GPU): peak memory at sequence lengths 64, 256 and 1024, with and without activation checkpointing.
- sampling: the recipe (fp32, batch 50, 2000 ancestral steps) against bf16 at a large batch with DDIM at 200 and
  50 steps, and with CUDA graphs (GPU); the real sampler loop, rounding included.
Every row also counts host synchronisations per step (a GPU that waits for the host idles): on CUDA those torch's
sync debug mode reports, on a CPU the reads of a tensor's value. A row that fails prints its error and the run
goes on. On a CPU the same command runs on the config's (small) model; there only the ratios mean anything.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode

from .config import Config
from .engines import DeepSpeedEngine, TorchEngine
from .modeling import TextDiffusionConfig, TextDiffusionModel
from .text import SamplingModelFn, TextObjective, compiled_network, sample_ids
from .train import EMA, BatchStream, dev_loss, ema_updater, loss_stream, model_config, run_loop

SECTIONS = ("training", "quality", "engines", "memory", "sampling")
RECIPE_BATCH, RECIPE_SAMPLE_BATCH, RECIPE_T = 64, 50, 2000


@dataclass(frozen=True)
class Variant:
    name: str
    batch: int
    bf16: bool
    attention: str  # eager or sdpa
    compile: bool
    fused: bool
    engine: str = "torch"
    zero_stage: int = 0
    cast_weights: bool = False  # DeepSpeed's own bf16 mode instead of autocast
    checkpointing: bool = False  # recompute the denoiser's activations in backward
    lr_scale: float = 1.0  # the learning rate relative to the config's


@dataclass
class Row:
    seconds_per_step: float
    sequences_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: Optional[float]
    peak_memory_gb: Optional[float]
    host_syncs: float  # per step


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


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (on a GPU each waits for the queue to drain). Reads
    inside torch.optim are left out: AdamW's step counters live on the host unless it is fused."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "__bool__", "__float__", "__int__", "tolist", "__index__"):
            if not any("torch/optim/" in f.filename for f in traceback.extract_stack(limit=6)):
                self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(fn: Callable[[], None], device: torch.device) -> int:
    """Host synchronisations during fn(): on CUDA those that torch's sync debug mode reports, on a CPU the reads
    of tensor values (HostReads)."""
    if device.type != "cuda":
        with HostReads() as reads:
            fn()
        return reads.count
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class Trainer:
    """A training set-up as `difflm train` builds it (model, EMA, loss module, engine, the loop's step) on `ids`."""

    def __init__(self, cfg: Config, vocab: int, v: Variant, device: torch.device, ids: torch.Tensor,
                 max_steps: Optional[int] = None):
        torch.manual_seed(0)
        self.mcfg = model_config(cfg, vocab, attention=v.attention)
        self.model = TextDiffusionModel(self.mcfg).to(device).train()
        if v.checkpointing:
            self.model.denoiser.gradient_checkpointing_enable()
        # the warm-up spans as many sequences as the config's does at its own batch size
        warmup = round(cfg.train.warmup_steps * cfg.train.batch_size / v.batch)
        self.cfg = replace(cfg.train, batch_size=v.batch, lr=cfg.train.lr * v.lr_scale, warmup_steps=warmup,
                           engine=v.engine, zero_stage=v.zero_stage, cast_weights=v.cast_weights, compile=v.compile,
                           grad_accum=1, precision="bf16" if v.bf16 else "fp32", deepspeed_config="",
                           max_minutes=0.0, max_steps=max_steps or cfg.train.max_steps)
        ema = EMA(self.model, self.cfg.ema_decay)
        objective = TextObjective(torch.compile(self.model) if v.compile else self.model)
        self.engine = (TorchEngine(objective, self.cfg, fused=v.fused and device.type == "cuda") if v.engine == "torch"
                       else DeepSpeedEngine(objective, self.cfg))
        g = torch.Generator(device=device).manual_seed(0)
        self.next_loss = loss_stream(objective, self.engine, BatchStream(ids, v.batch, 0), g)
        self.after_step, self.steps = ema_updater(self.engine, ema, self.model), 0

    def loop(self, n: int) -> None:
        """n more steps of the training loop, which logs (reads the loss back) only at its last step."""
        end = self.steps + n
        run_loop(self.engine, self.next_loss, dict, lambda step: None,
                 replace(self.cfg, max_steps=end, log_every=end, eval_every=end, save_every=end), Path(os.devnull),
                 after_step=self.after_step, show_progress=False, start_step=self.steps)
        self.steps = end


def time_training(cfg: Config, vocab: int, v: Variant, device: torch.device, steps: int, warmup: int,
                  peak: float) -> Row:
    """Seconds per training step of `v` (after `warmup` steps), throughput, MFU, peak memory and host syncs."""
    ids = torch.randint(0, vocab, (4 * v.batch, cfg.data.seq_len), device=device)
    trainer = Trainer(cfg, vocab, v, device, ids)
    trainer.loop(warmup)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.loop(steps)
    _sync(device)
    sec = (time.perf_counter() - start) / steps
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    one, three = (count_host_syncs(lambda k=k: trainer.loop(k), device) for k in (1, 3))
    flops = train_flops_per_sequence(trainer.mcfg) * v.batch / sec
    return Row(sec, v.batch / sec, v.batch * cfg.data.seq_len / sec, flops / 1e12, flops / peak if peak else None,
               memory, (three - one) / 2)


class Bench:
    """The measurements of one run, each table printed as soon as its rows are measured; a row that fails
    prints its error instead."""

    def __init__(self, cfg: Config, vocab: int, device: torch.device, steps: int, warmup: int,
                 emit: Callable[[str], None] = print, lr_scale: Optional[float] = None,
                 record: Optional[Callable[[dict], None]] = None):
        self.cfg, self.vocab, self.device, self.steps, self.warmup, self.emit = cfg, vocab, device, steps, warmup, emit
        self.record = record or (lambda row: None)  # each measured row as a dict, as soon as it is measured
        self.lr_scale = lr_scale  # the larger batch's learning rate over the config's (None: the batch ratio)
        self.cuda = device.type == "cuda"
        self.peak = matmul_peak(device, bf16=self.cuda)
        self.rows: Dict[Variant, Optional[Row]] = {}

    def row(self, v: Variant, cfg: Optional[Config] = None, steps: Optional[int] = None) -> Optional[Row]:
        """The measured row of `v` (measured once per run), or None after printing why it failed."""
        key = replace(v, name="") if cfg is None else None
        if key in self.rows:
            return self.rows[key]
        try:
            row = time_training(cfg or self.cfg, self.vocab, v, self.device, steps or self.steps,
                                min(self.warmup, steps or self.warmup), self.peak)
        except Exception as e:  # one failed configuration must not cost the rest of a GPU session's measurements
            self.emit(f"({v.name}: {_failure(e)})")
            row = None
        finally:
            if self.cuda:
                torch.cuda.empty_cache()
        if key is not None:
            self.rows[key] = row
        return row

    def variants(self, fast_batch: int) -> List[Variant]:
        c = self.cuda
        recipe = Variant("recipe", RECIPE_BATCH, bf16=False, attention="eager", compile=False, fused=False)
        scale = self.lr_scale or fast_batch / RECIPE_BATCH
        return [recipe, Variant("difflm", fast_batch, bf16=c, attention="sdpa", compile=c, fused=c, lr_scale=scale)]

    def header(self) -> None:
        where = (torch.cuda.get_device_name(self.device) if self.cuda
                 else "CPU (absolute figures are not meaningful: ratios only)")
        m = self.cfg.model
        self.record({"section": "device", "device": where, "peak_tflops": self.peak / 1e12, "layers": m.num_layers,
                     "hidden": m.hidden_size, "embed_dim": m.embed_dim, "seq_len": self.cfg.data.seq_len,
                     "vocab": self.vocab})
        self.emit(f"device: {where}; measured {'bf16' if self.cuda else 'fp32'} matmul peak "
                  f"{self.peak / 1e12:.2f} TFLOP/s; model {m.num_layers} x {m.hidden_size}, d={m.embed_dim}, "
                  f"length {self.cfg.data.seq_len}, vocabulary {self.vocab}\n")

    def training(self, fast_batch: int) -> None:
        self.emit("| training | batch | bf16 | attention | compile | fused AdamW | ms/step | seq/s | tokens/s | "
                  "TFLOP/s | MFU | peak GB | host syncs/step |")
        self.emit("| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        rows = []
        for v in self.variants(fast_batch):
            r = self.row(v)
            rows.append(r)
            if r is not None:
                self.record({"section": "training", "name": v.name, "batch": v.batch, "bf16": v.bf16,
                             "attention": v.attention, "compile": v.compile, "fused": v.fused, **asdict(r)})
                self.emit(f"| {v.name} | {v.batch} | {v.bf16} | {v.attention} | {v.compile} | {v.fused} | "
                          f"{1000 * r.seconds_per_step:.1f} | {r.sequences_per_s:,.0f} | {r.tokens_per_s:,.0f} | "
                          f"{r.tflops:.2f} | {_pct(r.mfu)} | {_gb(r)} | {r.host_syncs:g} |")
        if all(rows):
            ratio = rows[1].sequences_per_s / rows[0].sequences_per_s
            self.record({"section": "training", "name": "ratio", "ratio": ratio})
            self.emit(f"\ntraining throughput ratio difflm / recipe: {ratio:.2f}x")
        self.emit("")

    def engines(self, fast_batch: int) -> None:
        """Plain PyTorch against DeepSpeed at identical settings (the fast variant without compile), DeepSpeed's
        own bf16 mode, and plain against ZeRO-2 both compiled (GPU)."""
        base = replace(self.variants(fast_batch)[1], name="plain PyTorch", compile=False)
        rows = [base] + [replace(base, name=f"DeepSpeed ZeRO-{s}", engine="deepspeed", zero_stage=s) for s in range(4)]
        if self.cuda:
            rows += [replace(base, name="DeepSpeed ZeRO-2, cast weights", engine="deepspeed", zero_stage=2,
                             cast_weights=True),
                     replace(base, name="plain PyTorch + compile", compile=True),
                     replace(base, name="DeepSpeed ZeRO-2 + compile", engine="deepspeed", zero_stage=2, compile=True)]
        self.emit(f"| engine (batch {base.batch}, {'bf16' if base.bf16 else 'fp32'}) | ms/step | ratio to plain | "
                  f"peak GB | host syncs/step |")
        self.emit("| --- | ---: | ---: | ---: | ---: |")
        for v in rows:
            r = self.row(v)
            ref = self.row(replace(base, compile=v.compile))  # measured earlier in this list: read from the cache
            if r is not None:
                ratio = f"{r.seconds_per_step / ref.seconds_per_step:.2f}x" if ref else ""
                self.record({"section": "engines", "name": v.name, "batch": v.batch, **asdict(r),
                             "ratio_to_plain": r.seconds_per_step / ref.seconds_per_step if ref else None})
                self.emit(f"| {v.name} | {1000 * r.seconds_per_step:.1f} | {ratio} | {_gb(r)} | {r.host_syncs:g} |")
        self.emit("\n(ratio: step time over plain PyTorch's with the same compile setting)\n")

    def memory(self) -> None:
        if not self.cuda:
            self.emit("(peak memory by sequence length is measured on CUDA only)\n")
            return
        base = Variant("memory", RECIPE_BATCH, bf16=True, attention="sdpa", compile=False, fused=True)
        self.emit(f"| length (batch {base.batch}, bf16) | peak GB | peak GB, activation checkpointing |")
        self.emit("| ---: | ---: | ---: |")
        for length in (64, 256, 1024):
            cfg = replace(self.cfg, data=replace(self.cfg.data, seq_len=length))
            cells = [self.row(replace(base, name=f"length {length}", checkpointing=c), cfg=cfg, steps=2)
                     for c in (False, True)]
            self.record({"section": "memory", "length": length, "batch": base.batch,
                         "peak_gb": cells[0].peak_memory_gb if cells[0] else None,
                         "peak_gb_checkpointing": cells[1].peak_memory_gb if cells[1] else None})
            self.emit(f"| {length} | {' | '.join(_gb(c) if c else 'failed' for c in cells)} |")
        self.emit("")

    def quality(self, fast_batch: int, total: int, points: int = 4) -> None:
        """Dev loss against training sequences seen, for both variants, on the embedded grammar corpus (always at
        hand, no download); each variant's schedule spans the run."""
        from .data import build_tokenizer, encode
        from .grammar import builtin_grammar

        g = builtin_grammar()
        texts, dev_texts = g.corpus(20000, seed=1), g.corpus(512, seed=2)
        tok = build_tokenizer(texts)
        ids, _ = encode(texts, tok, self.cfg.data.seq_len)
        dev_ids, _ = encode(dev_texts, tok, self.cfg.data.seq_len)
        ids, dev_ids = ids.to(self.device), dev_ids.to(self.device)
        marks = [total * (k + 1) // points for k in range(points)]
        variants, curves = self.variants(fast_batch), []
        for v in variants:
            trainer = Trainer(self.cfg, len(tok), v, self.device, ids, max_steps=max(1, total // v.batch))
            curve = []
            for mark in marks:
                more = -(-mark // v.batch) - trainer.steps  # steps until `mark` sequences are seen
                if more > 0:
                    trainer.loop(more)
                curve.append(dev_loss(TextObjective(trainer.model), dev_ids, 128, 4))
            curves.append(curve)
        self.emit("| sequences seen | " + " | ".join(f"dev loss, {v.name} (batch {v.batch}, lr "
                                                    f"{self.cfg.train.lr * v.lr_scale:.2g})" for v in variants) + " |")
        self.emit("| ---: |" + " ---: |" * len(variants))
        for k, mark in enumerate(marks):
            self.record({"section": "quality", "sequences": mark, **{v.name: c[k] for v, c in zip(variants, curves)}})
            self.emit(f"| {mark:,} | " + " | ".join(f"{c[k]:.4f}" for c in curves) + " |")
        self.emit("\n(embedded grammar corpus; warm-up over the same number of sequences for both; the larger "
                  "batch's learning rate scaled by " + (f"{self.lr_scale:g}" if self.lr_scale else "the batch ratio")
                  + ")\n")

    @torch.no_grad()
    def sampling(self, sample_batch: int) -> None:
        """The sampler loop with rounding, per the recipe and difflm's settings; the recipe's 2000 steps are
        timed over 100 of them (every step costs the same) and scaled."""
        cfg = replace(self.cfg, diffusion=replace(self.cfg.diffusion, num_steps=RECIPE_T))
        runs = [("recipe (fp32, ancestral)", RECIPE_SAMPLE_BATCH, False, "eager", False, "ddpm", 100, RECIPE_T)]
        for k in (200, 50):
            runs.append((f"difflm ({'bf16, ' if self.cuda else ''}DDIM)", sample_batch, self.cuda, "sdpa", False,
                         "ddim", k, k))
        if self.cuda:
            runs.append(("difflm (bf16, DDIM, CUDA graphs)", sample_batch, True, "sdpa", True, "ddim", 200, 200))
        self.emit("| sampling | batch | steps | s/step | seq/s | ratio to recipe | host syncs/step |")
        self.emit("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        recipe_rate = None
        for name, batch, bf16, attention, compiled, sampler, timed, steps in runs:
            try:
                per_step, syncs = self.time_sampler(cfg, batch, bf16, attention, compiled, sampler, timed)
            except Exception as e:
                self.emit(f"({name}, {steps} steps: {_failure(e)})")
                continue
            rate = batch / (steps * per_step)
            recipe_rate = recipe_rate or rate
            self.record({"section": "sampling", "name": name, "batch": batch, "steps": steps, "s_per_step": per_step,
                         "sequences_per_s": rate, "ratio_to_recipe": rate / recipe_rate, "host_syncs": syncs})
            self.emit(f"| {name} | {batch} | {steps} | {per_step:.4f} | {rate:,.3f} | {rate / recipe_rate:.1f}x | "
                      f"{syncs:g} |")
        self.emit("")

    def time_sampler(self, cfg: Config, batch: int, bf16: bool, attention: str, compiled: bool, sampler: str,
                     steps: int):
        """(seconds per sampler step over a `steps`-step run after a warm-up run, host syncs per step)."""
        torch.manual_seed(0)
        model = TextDiffusionModel(model_config(cfg, self.vocab, attention=attention)).to(self.device).eval()
        net = compiled_network(model) if compiled else model

        def draw(k):
            sample_ids(model, SamplingModelFn(model, net=net), batch, steps=k, sampler=sampler,
                       network_dtype=torch.bfloat16 if bf16 else None).tolist()

        draw(3 if compiled else 2)
        _sync(self.device)
        start = time.perf_counter()
        draw(steps)
        per_step = (time.perf_counter() - start) / steps
        one, three = (count_host_syncs(lambda k=k: draw(k), self.device) for k in (2, 4))
        return per_step, (three - one) / 2


def run(cfg: Config, vocab: int, device: torch.device, steps: int = 20, warmup: int = 5,
        fast_batch: Optional[int] = None, sample_batch: Optional[int] = None, quality_sequences: int = 0,
        sections=SECTIONS, emit: Callable[[str], None] = print, lr_scale: Optional[float] = None,
        record: Optional[Callable[[dict], None]] = None) -> None:
    """Measure the chosen sections, emitting markdown tables as they finish (and each row to `record`)."""
    cuda = device.type == "cuda"
    fast_batch = fast_batch or (512 if cuda else 256)
    sample_batch = sample_batch or (512 if cuda else 256)
    bench = Bench(cfg, vocab, device, steps, warmup, emit, lr_scale, record)
    bench.header()
    if "training" in sections:
        bench.training(fast_batch)
    if "quality" in sections and quality_sequences:
        bench.quality(fast_batch, quality_sequences)
    if "engines" in sections:
        bench.engines(fast_batch)
    if "memory" in sections:
        bench.memory()
    if "sampling" in sections:
        bench.sampling(sample_batch)


def _failure(e: Exception) -> str:
    """What a failed measurement prints in place of its row."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"failed: {type(e).__name__}: {str(e)[:300]}"


def _gb(row: Row) -> str:
    return "" if row.peak_memory_gb is None else f"{row.peak_memory_gb:.2f}"


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"
