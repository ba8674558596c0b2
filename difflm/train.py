"""The training loop: data -> tokenizer -> model -> AdamW (warm-up, linear decay), clipping, EMA, dev loss,
atomic checkpoints, a progress bar and JSON-lines metrics.

The optimizer step lives in an engine object (`TorchEngine`) so that another engine (DeepSpeed) can take its
place without touching the loop.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from tqdm.auto import tqdm

from .config import Config, TrainConfig, save_config
from .data import build_tokenizer, encode, load_texts, load_tokenizer, special_ids
from .diffusion import PREDICTIONS
from .errors import DifflmError
from .files import AtomicDir
from .modeling import TextDiffusionConfig, TextDiffusionModel
from .schedules import SCHEDULES
from .text import save_model, text_loss

log = logging.getLogger("difflm")
ENGINES = ("torch",)


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    stopped_by_time: bool
    dev_loss: float


class TorchEngine:
    """Plain PyTorch: AdamW, LR warm-up then linear decay to zero at max_steps, gradient-norm clipping."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))

    def step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def prepare_data(cfg: Config):
    """(tokenizer, train ids (N, L), dev ids (M, L)) for the configured data."""
    texts = load_texts(cfg.data)
    tokenizer = (load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer
                 else build_tokenizer(texts.train, cfg.data.min_freq, cfg.data.lowercase))
    train_ids, n_trunc = encode(texts.train, tokenizer, cfg.data.seq_len)
    dev_ids, n_trunc_dev = encode(texts.dev, tokenizer, cfg.data.seq_len)
    log.info("data: %d train / %d dev texts, vocabulary %d, length %d; truncated %d train and %d dev texts",
             len(train_ids), len(dev_ids), len(tokenizer), cfg.data.seq_len, n_trunc, n_trunc_dev)
    return tokenizer, train_ids, dev_ids


def build_model(cfg: Config, tokenizer) -> TextDiffusionModel:
    start, end, pad = special_ids(tokenizer)
    m = cfg.model
    mcfg = TextDiffusionConfig(vocab_size=len(tokenizer), seq_len=cfg.data.seq_len, embed_dim=m.embed_dim,
                               hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                               intermediate_size=m.intermediate_size, dropout=m.dropout,
                               schedule=cfg.diffusion.schedule, num_steps=cfg.diffusion.num_steps,
                               prediction=cfg.diffusion.prediction, start_id=start, end_id=end, pad_id=pad,
                               denoiser_attn=m.attn_implementation, self_condition=m.self_condition)
    return TextDiffusionModel(mcfg)


@torch.no_grad()
def dev_loss(model: TextDiffusionModel, ids: torch.Tensor, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean text loss on the first `batches` dev batches with fixed noise (comparable across evaluations)."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=ids.device).manual_seed(seed)
    losses = [text_loss(model, ids[i: i + batch_size], generator=g).loss.item()
              for i in range(0, min(len(ids), batch_size * batches), batch_size)]
    model.train(was_training)
    return sum(losses) / len(losses)


def batches(ids: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches of rows of `ids`, a new permutation each epoch (a last partial batch is dropped)."""
    if len(ids) < batch_size:
        log.warning("only %d training sequences: batches of %d instead of %d", len(ids), len(ids), batch_size)
        batch_size = len(ids)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ids), generator=g).to(ids.device)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield ids[order[i: i + batch_size]]


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DifflmError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifflmError(f"device {name!r} requested but no CUDA GPU is visible; use device=auto or cpu")
    return device


def _check(cfg: Config) -> None:
    t = cfg.train
    if t.engine not in ENGINES:
        raise DifflmError(f"train.engine {t.engine!r} is not available; choose one of {', '.join(ENGINES)}")
    for name in ("batch_size", "max_steps", "log_every", "eval_every", "save_every"):
        if getattr(t, name) < 1:
            raise DifflmError(f"train.{name} must be positive, got {getattr(t, name)}")
    if cfg.data.seq_len < 3:
        raise DifflmError(f"data.seq_len must be at least 3 (START, one token, END), got {cfg.data.seq_len}")
    m, d = cfg.model, cfg.diffusion
    if m.hidden_size % m.num_heads:
        raise DifflmError(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    if d.schedule not in SCHEDULES:
        raise DifflmError(f"unknown diffusion.schedule {d.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if d.prediction not in PREDICTIONS:
        raise DifflmError(f"unknown diffusion.prediction {d.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if d.num_steps < 1:
        raise DifflmError(f"diffusion.num_steps must be positive, got {d.num_steps}")


def train(cfg: Config, show_progress: bool = True) -> TrainResult:
    """Train a text diffusion model as configured; the EMA model is saved to `<out_dir>/model`."""
    _check(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    tokenizer, train_ids, dev_ids = prepare_data(cfg)
    train_ids, dev_ids = train_ids.to(device), dev_ids.to(device)
    model = build_model(cfg, tokenizer).to(device).train()
    log.info("model: %.2fM parameters (denoiser %d x %d, embedding dim %d), %s schedule, T=%s, predicts %s",
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.model.num_layers, cfg.model.hidden_size,
             cfg.model.embed_dim, cfg.diffusion.schedule, cfg.diffusion.num_steps, cfg.diffusion.prediction)
    engine = TorchEngine(model, t)
    ema = EMA(model, t.ema_decay)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    metrics = (out / "metrics.jsonl").open("w")
    g = torch.Generator(device=device).manual_seed(t.seed)
    data = batches(train_ids, t.batch_size, t.seed)
    start_time, step, stopped_by_time, last_dev = time.time(), 0, False, float("nan")
    bar = tqdm(total=t.max_steps, desc="train", disable=not show_progress, dynamic_ncols=True)
    while step < t.max_steps:
        losses = text_loss(model, next(data), generator=g)
        if not torch.isfinite(losses.loss):
            raise DifflmError(f"loss became {losses.loss.item()} at step {step}; lower train.lr or raise grad_clip")
        grad_norm = engine.step(losses.loss)
        ema.update(model, step)
        step += 1
        bar.update(1)
        record = None
        if step % t.log_every == 0 or step == t.max_steps:
            record = {"step": step, "loss": losses.loss.item(), "denoising": losses.denoising.item(),
                      "rounding": losses.rounding.item(), "prior": losses.prior.item(), "grad_norm": grad_norm,
                      "lr": engine.lr, "elapsed_s": round(time.time() - start_time, 2)}
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        elapsed_min = (time.time() - start_time) / 60
        stopped_by_time = bool(t.max_minutes) and elapsed_min >= t.max_minutes and step < t.max_steps
        if step % t.eval_every == 0 or step == t.max_steps or stopped_by_time:
            record = record or {"step": step, "elapsed_s": round(time.time() - start_time, 2)}
            record["dev_loss"] = dev_loss(model, dev_ids, t.batch_size, t.eval_batches)
            record["dev_loss_ema"] = last_dev = dev_loss(ema.model, dev_ids, t.batch_size, t.eval_batches)
            bar.set_postfix(loss=f"{losses.loss.item():.4f}", dev=f"{last_dev:.4f}", refresh=False)
        if record:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if step % t.save_every == 0 or step == t.max_steps or stopped_by_time:
            save_checkpoint(out, model, ema, engine, tokenizer, step, cfg)
        if stopped_by_time:
            log.warning("stopping at step %d of %d: train.max_minutes=%g reached", step, t.max_steps, t.max_minutes)
            break
    bar.close()
    metrics.close()
    log.info("trained %d steps in %.1f min; dev loss (EMA) %.4f; model saved to %s",
             step, (time.time() - start_time) / 60, last_dev, out / "model")
    return TrainResult(model_dir=out / "model", steps=step, stopped_by_time=stopped_by_time, dev_loss=last_dev)


def save_checkpoint(out: Path, model, ema: EMA, engine: TorchEngine, tokenizer, step: int, cfg: Config) -> None:
    """The EMA model for generation (`model/`) and the full training state (`checkpoint/`), each atomically."""
    save_model(ema.model, tokenizer, out / "model")
    with AtomicDir(out / "checkpoint") as tmp:
        torch.save({"step": step, "model": model.state_dict(), "ema": ema.model.state_dict(),
                    "engine": engine.state_dict(), "config": cfg.to_dict()}, tmp / "trainer_state.pt")
