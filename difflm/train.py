"""The training loop: data -> tokenizer -> model -> AdamW (warm-up, linear decay), clipping, EMA, dev loss,
atomic checkpoints, a progress bar and JSON-lines metrics.

The optimizer step lives in an engine object (`engines.TorchEngine` or `engines.DeepSpeedEngine`), so the loop
is the same for both.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

from .card import CARD, data_facts, new_card, training_facts
from .config import Config, LoopConfig, config_yaml, save_config
from .curves import TrainingCurves, require_tensorboard
from .data import (TextSplits, attribute_names, attribute_vectors, build_tokenizer, encode, load_texts,
                   load_tokenizer, special_ids)
from .diffusion import PREDICTIONS
from .engines import engine_config, make_engine
from .errors import DifflmError, TrainingInterrupted, check_choice
from .files import check_out_dir, start_out_dir
from .modeling import TextDiffusionConfig, TextDiffusionModel
from .runtime import Setup, rank, resolve_device, world_size
from .schedules import ENDPOINT_SCHEDULES, SCHEDULES
from .text import TextObjective, save_model

log = logging.getLogger("difflm")
TRAINING_CONFIG = "training_config.yaml"  # saved beside the weights: the data a model was trained on


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    stopped_by_time: bool
    dev_loss: float


class EMA:
    """Exponential moving average of the weights, with the usual warm-up min(decay, (1 + n) / (10 + n)); buffers
    are copied as they are."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema = list(self.model.parameters())
        # one multi-tensor kernel, not one per parameter; the average stays fp32 when the weights are bf16/fp16
        torch._foreach_lerp_(ema, [p.to(e.dtype) for e, p in zip(ema, model.parameters())], 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):  # state such as the time warp's fit: as trained
            e.copy_(b)


def prepare_data(cfg: Config, tokenizer=None, texts: Optional[TextSplits] = None):
    """(tokenizer, train ids (N, L), dev ids (M, L), counts) for the configured data; `tokenizer` overrides the
    one cfg.data would build or load, `texts` the text it would load. `counts`: split sizes and truncations."""
    texts = texts or load_texts(cfg.data)
    if tokenizer is None:
        tokenizer = (load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer
                     else build_tokenizer(texts.train, cfg.data.min_freq, cfg.data.lowercase))
    train_ids, n_trunc = encode(texts.train, tokenizer, cfg.data.seq_len)
    dev_ids, n_trunc_dev = encode(texts.dev, tokenizer, cfg.data.seq_len)
    log.info("data: %d train / %d dev texts, vocabulary %d, length %d; truncated %d train and %d dev texts",
             len(train_ids), len(dev_ids), len(tokenizer), cfg.data.seq_len, n_trunc, n_trunc_dev)
    counts = {"train_texts": len(train_ids), "dev_texts": len(dev_ids), "truncated_train": n_trunc,
              "truncated_dev": n_trunc_dev, "vocabulary": len(tokenizer)}
    return tokenizer, train_ids, dev_ids, counts


def model_config(cfg: Config, vocab_size: int, special: tuple = (0, 1, 2),
                 attention: Optional[str] = None, attributes: Optional[List[str]] = None) -> TextDiffusionConfig:
    """The Hugging Face config of the text model that `cfg` describes; `special` is (start, end, pad)."""
    m, d, start, end, pad = cfg.model, cfg.diffusion, *special
    return TextDiffusionConfig(vocab_size=vocab_size, seq_len=cfg.data.seq_len, embed_dim=m.embed_dim,
                               hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                               intermediate_size=m.intermediate_size, dropout=m.dropout,
                               schedule=d.schedule, num_steps=d.num_steps, prediction=d.prediction,
                               start_id=start, end_id=end, pad_id=pad,
                               denoiser_attn=attention or m.attn_implementation, self_condition=m.self_condition,
                               attributes=attributes, attribute_dropout=m.attribute_dropout,
                               unconditional_prob=m.unconditional_prob, output=m.output,
                               embedding_norm=m.embedding_norm, mse_weight=m.mse_weight, ce_weight=m.ce_weight,
                               log_snr_max=d.log_snr_max, log_snr_min=d.log_snr_min, noise_scale=d.noise_scale,
                               time_warp_bins=d.time_warp_bins, sample_temperature=m.sample_temperature,
                               objective=m.objective, posterior_logits=m.posterior_logits,
                               explicit_length=m.explicit_length, log_snr_max_floor=d.log_snr_max_floor,
                               time_input=m.time_input, self_condition_rows=m.self_condition_rows,
                               zero_init_output=m.zero_init_output, denoiser=m.denoiser)


def build_model(cfg: Config, tokenizer, attributes: Optional[List[str]] = None) -> TextDiffusionModel:
    return TextDiffusionModel(model_config(cfg, len(tokenizer), special_ids(tokenizer), attributes=attributes))


def text_setup(cfg: Config) -> Setup:
    tokenizer, train_ids, dev_ids, counts, attributes = training_rows(cfg)
    model = build_model(cfg, tokenizer, attributes)
    if cfg.model.explicit_length:
        model.set_lengths(train_ids[:, : cfg.data.seq_len])
    log.info("model: %.2fM parameters (denoiser %d x %d, embedding dim %d), %s schedule, T=%s, predicts %s",
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.model.num_layers, cfg.model.hidden_size,
             cfg.model.embed_dim, cfg.diffusion.schedule, cfg.diffusion.num_steps, cfg.diffusion.prediction)
    return Setup(tokenizer, train_ids, dev_ids, model, TextObjective, counts)


def training_rows(cfg: Config):
    """(tokenizer, train rows, dev rows, counts, attribute names): token ids, followed for a model conditioned on
    attributes (model.attributes) by each text's 0/1 attribute vector (text.TextObjective splits them)."""
    if not cfg.model.attributes:
        return (*prepare_data(cfg), None)
    texts = load_texts(cfg.data)
    texts.require_meanings("model.attributes", "set model.attributes=false")
    tokenizer, train_ids, dev_ids, counts = prepare_data(cfg, texts=texts)
    names = attribute_names(texts.train_mr)
    log.info("conditioning on %d attributes (field=value pairs seen twice or more)", len(names))
    return (tokenizer, torch.cat([train_ids, attribute_vectors(texts.train_mr, names)], 1),
            torch.cat([dev_ids, attribute_vectors(texts.dev_mr, names)], 1), counts, names)


@torch.no_grad()
def dev_loss(objective: TextObjective, ids: torch.Tensor, batch_size: int, batches: int, seed: int = 0) -> float:
    """Mean text loss on the first `batches` dev batches with fixed noise (comparable across evaluations)."""
    was_training = objective.training
    objective.eval()
    g = torch.Generator(device=ids.device).manual_seed(seed)
    losses = [objective(ids[i: i + batch_size], generator=g).loss.item()
              for i in range(0, min(len(ids), batch_size * batches), batch_size)]
    objective.train(was_training)
    return sum(losses) / len(losses)


class BatchStream:
    """Endless shuffled batches of rows of `ids`, a new permutation each epoch (a last partial batch is dropped);
    its state (the epoch's generator state and the position in it) resumes the exact same sequence.

    With `lengths` (N,) the batches are bucketed: each window of `window` batches of the permutation is sorted by
    length and cut into batches, and the batches are shuffled, so that rows of a batch have similar lengths (a
    model that trims its batches to the longest row then spends little on padding)."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seed: int, lengths: Optional[torch.Tensor] = None,
                 window: int = 32):
        if len(ids) < batch_size:
            log.warning("only %d training sequences: batches of %d instead of %d", len(ids), len(ids), batch_size)
            batch_size = len(ids)
        self.ids, self.batch_size, self.lengths, self.window = ids, batch_size, lengths, window
        self.generator = torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_state = self.generator.get_state()
        order = torch.randperm(len(self.ids), generator=self.generator)
        if self.lengths is not None:
            order = self._bucketed(order)
        self.order = order.to(self.ids.device)
        self.position = 0

    def _bucketed(self, order: torch.Tensor) -> torch.Tensor:
        b = self.batch_size
        order = order[: len(order) // b * b]
        lengths = self.lengths.cpu()[order]
        for a in range(0, len(order), b * self.window):
            part = slice(a, a + b * self.window)
            order[part] = order[part][torch.sort(lengths[part], stable=True).indices]
        batches = order.view(-1, b)
        return batches[torch.randperm(len(batches), generator=self.generator)].flatten()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.order):
            self._new_epoch()
        batch = self.ids[self.order[self.position: self.position + self.batch_size]]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch_state": self.epoch_state, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["epoch_state"])
        self._new_epoch()
        self.position = state["position"]


def _bucket_lengths(model, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """Each training row's length for BatchStream's buckets: for a text model of config.explicit_length (which
    trims its batches), None otherwise."""
    config = getattr(model, "config", None)
    if not getattr(config, "explicit_length", False):
        return None
    return model.lengths(rows[:, : config.seq_len])


def _check(cfg: Config) -> None:
    engine_config(cfg.train)
    d = cfg.diffusion
    check_choice("diffusion.schedule", d.schedule, SCHEDULES)
    check_choice("diffusion.prediction", d.prediction, PREDICTIONS)
    check_choice("data.modality", cfg.data.modality, ("text", "image"))
    _check_recipe(cfg)


def _check_recipe(cfg: Config) -> None:
    """Options of the recipe that contradict one another: a one-line error naming both keys."""
    m, d = cfg.model, cfg.diffusion
    if m.output == "logits" and d.prediction != "x0":
        raise DifflmError(f"model.output=logits makes the denoiser predict x0 (softmax(logits) E); it contradicts "
                          f"diffusion.prediction={d.prediction}: set diffusion.prediction=x0")
    if d.time_warp_bins and d.num_steps is not None and d.time_warp_bins > d.num_steps:
        raise DifflmError(f"diffusion.time_warp_bins={d.time_warp_bins} is finer than diffusion.num_steps="
                          f"{d.num_steps}: some bins would hold no step; use at most num_steps bins")
    if d.time_warp_bins and d.schedule == "learned":
        raise DifflmError("diffusion.time_warp_bins warps t against the loss while diffusion.schedule=learned moves "
                          "the noise levels under it; use one of the two")
    if m.objective == "elbo":
        if d.num_steps is not None:
            raise DifflmError(f"model.objective=elbo trains the continuous-time ELBO; it contradicts "
                              f"diffusion.num_steps={d.num_steps}: set diffusion.num_steps=null")
        if d.schedule not in ENDPOINT_SCHEDULES:
            raise DifflmError(f"model.objective=elbo needs finite log-SNR endpoints; diffusion.schedule={d.schedule} "
                              f"has none: use diffusion.schedule=learned (or logsnr-linear)")
        if d.time_warp_bins:
            raise DifflmError(f"model.objective=elbo draws t uniformly (low-discrepancy), its schedule learned "
                              f"instead; it contradicts diffusion.time_warp_bins={d.time_warp_bins}: set it to 0")
        if d.noise_scale != 1.0:
            raise DifflmError(f"model.objective=elbo learns the log-SNR endpoints; diffusion.noise_scale="
                              f"{d.noise_scale:g} would shift them: drop it and set diffusion.log_snr_max/min")
    if m.time_input == "log_snr" and (d.num_steps is not None or d.schedule not in ENDPOINT_SCHEDULES):
        raise DifflmError(f"model.time_input=log_snr reads the log-SNR of a continuous schedule with finite endpoints; "
                          f"it contradicts diffusion.schedule={d.schedule}" + (
                              f" with diffusion.num_steps={d.num_steps}" if d.num_steps is not None else "") +
                          ": use diffusion.schedule=learned (or logsnr-linear) and diffusion.num_steps=null")
    if cfg.train.posterior_warmup_steps and not m.posterior_logits:
        raise DifflmError(f"train.posterior_warmup_steps={cfg.train.posterior_warmup_steps} warms up the posterior logits; "
                          f"it needs model.posterior_logits=true (or set it to 0)")
    if m.explicit_length and d.prediction != "x0":
        raise DifflmError(f"model.explicit_length gives the PAD positions' x0 exactly; it contradicts "
                          f"diffusion.prediction={d.prediction}: set diffusion.prediction=x0")
    if cfg.train.schedule_lr and d.schedule != "learned":
        raise DifflmError(f"train.schedule_lr sets the learning rate of a learned noise schedule; diffusion.schedule="
                          f"{d.schedule} has no parameters: drop it or set diffusion.schedule=learned")
    if cfg.train.embedding_lr and cfg.data.modality == "image":
        raise DifflmError("train.embedding_lr sets the word embeddings' learning rate; data.modality=image has none: "
                          "drop it")
    endpoints = (d.log_snr_max, d.log_snr_min) != (10.0, -10.0)
    if endpoints and d.schedule not in ENDPOINT_SCHEDULES:
        raise DifflmError(f"diffusion.log_snr_max / log_snr_min set the endpoints of {', '.join(ENDPOINT_SCHEDULES)}; "
                          f"diffusion.schedule={d.schedule} has its own: drop them or change the schedule")


def train(cfg: Config, show_progress: bool = True, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train a text diffusion model as configured; the EMA model is saved to `<out_dir>/model`.
    With `resume`, continue exactly from `<out_dir>/checkpoint`; an out_dir that already holds a run is refused
    unless `resume` or `overwrite`. SIGTERM or SIGINT finishes the step, saves a checkpoint and raises
    TrainingInterrupted."""
    _check(cfg)
    t = cfg.train
    out = Path(t.out_dir)
    check_out_dir(out, "train.out_dir", resume=resume, overwrite=overwrite)
    require_tensorboard(t, "train")
    state = load_checkpoint(cfg) if resume else None
    if state and state["step"] >= t.max_steps:
        return _already_complete(out, state["step"])
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    if cfg.data.modality == "image":
        from .image import image_setup

        setup = image_setup(cfg)
    else:
        setup = text_setup(cfg)
    tokenizer, model = setup.tokenizer, setup.model.to(device).train()
    train_ids, dev_ids = setup.train_rows.to(device), setup.dev_rows.to(device)
    ema = EMA(model, t.ema_decay)  # an fp32 copy, taken before an engine may cast or partition the model
    # torch.compile wraps the denoiser; `model` stays the plain module, so weights save without a prefix
    objective = setup.objective(torch.compile(model) if t.compile else model)
    ema_objective = setup.objective(ema.model)
    engine = make_engine(objective, t)
    main = rank() == 0  # under a launcher only rank 0 writes; each rank draws its own batches
    if main:
        start_out_dir(out, overwrite=overwrite and not resume)
        save_config(cfg, out / "config.yaml")
    g = torch.Generator(device=device).manual_seed(t.seed + rank())
    data = BatchStream(train_ids, t.batch_size, t.seed + rank(), lengths=_bucket_lengths(model, train_ids))

    next_loss = loss_stream(objective, engine, data, g)

    last = {}  # the latest evaluation, for the model card
    began = time.time() - (state.get("train_seconds", 0.0) if state else 0.0)  # wall time across resumes

    def evaluate():
        last.update(dev_loss=dev_loss(objective, dev_ids, t.batch_size, t.eval_batches),
                    dev_loss_ema=dev_loss(ema_objective, dev_ids, t.batch_size, t.eval_batches))
        return dict(last)

    def save(step):
        with engine.gathered(model.parameters()):  # every rank takes part; rank 0 writes the weights
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()} if main else None
        seconds = time.time() - began
        card = new_card("image-diffusion" if cfg.data.modality == "image" else "diffusion", ema.model,
                        data_facts(cfg, setup.counts), training_facts(t, step, seconds, device, last, world_size()),
                        where=str(out / "model")) if main else ""  # only rank 0 writes the model
        save_checkpoint(out, weights, ema, engine, tokenizer, step, cfg, data, g, card=card, seconds=seconds)

    metrics_path = out / "metrics.jsonl" if main else Path(os.devnull)
    start = restore(state, cfg, model, ema, engine, data, g, metrics_path) if state else 0
    update_ema, warm_up = ema_updater(engine, ema, model), posterior_warmup(model, t.posterior_warmup_steps, start)
    result = run_loop(engine, next_loss, evaluate, save, t, metrics_path, show_progress=show_progress and main,
                      after_step=update_ema if warm_up is None else lambda s: (update_ema(s), warm_up(s + 1)),
                      start_step=start,
                      saved=f"checkpoint saved in {out / 'checkpoint'}", resumable=True)
    last_dev = result.last_eval.get("dev_loss_ema", float("nan"))
    log.info("trained %d steps in %.1f min; dev loss (EMA) %.4f; model saved to %s",
             result.steps, result.minutes, last_dev, out / "model")
    return TrainResult(model_dir=out / "model", steps=result.steps, stopped_by_time=result.stopped_by_time,
                       dev_loss=last_dev)


def _already_complete(out: Path, steps: int) -> TrainResult:
    """A resumed run that had already reached max_steps: say so, with its last dev loss; rewrite nothing."""
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "dev_loss_ema" in r] \
        if (out / "metrics.jsonl").is_file() else []
    last = evals[-1]["dev_loss_ema"] if evals else float("nan")
    log.info("the run in %s is already complete (%d of %d steps); dev loss (EMA) %.4f at step %s; model in %s",
             out, steps, steps, last, evals[-1]["step"] if evals else "?", out / "model")
    return TrainResult(model_dir=out / "model", steps=steps, stopped_by_time=False, dev_loss=last)


def loss_stream(objective: torch.nn.Module, engine, batches, generator: torch.Generator) -> Callable:
    """`next_loss` for run_loop: the loss module on the next batch, under the engine's autocast."""

    def next_loss():
        with engine.autocast():
            losses = objective(next(batches), generator=generator)
        return losses.loss, losses.parts()

    return next_loss


def ema_updater(engine, ema: EMA, model: torch.nn.Module) -> Callable[[int], None]:
    """`after_step` for run_loop: the EMA update, from gathered weights under ZeRO-3 (every rank takes part)."""

    def update(step: int) -> None:
        with engine.gathered(model.parameters()):
            ema.update(model, step)

    return update


def posterior_warmup(model: torch.nn.Module, steps: int, start: int) -> Optional[Callable[[int], None]]:
    """train.posterior_warmup_steps (Plaid's output-bias warm-up): in training the posterior logits are added at
    the weight min(1, n / steps) after n steps, so that a new network is not pinned at first to the per-position
    posterior, the best it can do without context; evaluation, the EMA copy and the saved model use weight 1.
    Returns the update to call with the number of steps done (None for steps = 0); the weight follows from the
    step alone, so a resumed run takes it up exactly. The weight is a 0-dim tensor changed in place, so a compiled
    network reads it as an input and is not traced again."""
    if not steps:
        return None
    model.posterior_scale = torch.zeros((), device=model.embedding.weight.device)

    def update(done: int) -> None:
        model.posterior_scale.fill_(min(1.0, done / steps))

    update(start)
    return update


@dataclass
class LoopResult:
    steps: int
    stopped_by_time: bool
    minutes: float
    last_eval: dict


def run_loop(engine, next_loss: Callable, evaluate: Callable[[], dict], save: Callable[[int], None], cfg: LoopConfig,
             metrics_path: Path, after_step: Optional[Callable[[int], None]] = None, show_progress: bool = True,
             desc: str = "train", start_step: int = 0, saved: str = "", resumable: bool = False) -> LoopResult:
    """The loop shared by every trainer: step, log a JSON line every `log_every`, evaluate every `eval_every`,
    save every `save_every`, and stop at `max_steps` or (saying so) after `max_minutes` of wall time. On SIGTERM
    or SIGINT it finishes the step, evaluates, saves and raises TrainingInterrupted (a second signal ends the
    process at once); under a launcher the ranks agree on the step to stop at.

    A step is one optimizer update over `engine.accumulation` micro-batches. `next_loss() -> (loss, {name: value})`
    draws a micro-batch and computes its loss; values may be tensors. Nothing is read back from the device
    between log, evaluation and save steps, so a GPU never waits for the host (a non-finite loss is noted on the
    device and reported at the next of those steps). A resumed run starts at `start_step` and appends to the
    metrics file. `saved` (what `save` wrote) and `resumable` (whether --resume continues it) go into the
    TrainingInterrupted for the CLI's message."""
    start, step, stopped_by_time, last_eval = time.time(), start_step, False, {}
    accumulation = getattr(engine, "accumulation", 1)
    health = LossHealth()
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=desc, disable=not show_progress, dynamic_ncols=True)
    curves = (TrainingCurves(metrics_path.parent, metrics_path, cfg.tensorboard, title=f"{desc}: {metrics_path.parent}")
              if str(metrics_path) != os.devnull else None)
    with open(metrics_path, "a" if start_step else "w") as metrics, StopSignals() as signals, _drawn(curves):
        while step < cfg.max_steps:
            losses, parts = [], []
            for _ in range(accumulation):
                loss, named = next_loss()
                health.watch(loss, step + 1)
                grad_norm = engine.step(loss)
                losses.append(loss.detach())
                parts.append(named)
            if after_step:
                after_step(step)
            step += 1
            bar.update(1)
            record = {}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                health.check()
                record = {"step": step, "loss": _mean(losses), **{k: _mean([p[k] for p in parts]) for k in parts[0]},
                          "grad_norm": float(grad_norm), "lr": engine.lr}
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            elapsed = (time.time() - start) / 60
            time_up = bool(cfg.max_minutes) and elapsed >= cfg.max_minutes
            stopped_by_time, signalled = (_stop_agreed(time_up, signals.received is not None, cfg, step)
                                          if step < cfg.max_steps else (False, False))
            stopping = stopped_by_time or signalled
            if step % cfg.eval_every == 0 or step == cfg.max_steps or stopping:
                health.check()
                last_eval = evaluate()
                record = {"step": step, **record, **last_eval}
                bar.set_postfix(loss=f"{_mean(losses):.4f}", **{k: f"{v:.4f}" for k, v in last_eval.items()},
                                refresh=False)
            if record:
                record["elapsed_s"] = round(time.time() - start, 2)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if curves is not None:
                    curves.record(record)
                    if last_eval and record.keys() & last_eval.keys():
                        curves.draw()
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                health.check()  # never save weights that a non-finite loss has touched
                save(step)
            if signalled:
                bar.close()
                stop = TrainingInterrupted(signals.received or signal.SIGTERM, step, cfg.max_steps)
                stop.saved, stop.resumable = saved, resumable
                raise stop
            if stopped_by_time:
                log.warning("stopping at step %d of %d: max_minutes=%g reached", step, cfg.max_steps, cfg.max_minutes)
                break
    bar.close()
    return LoopResult(steps=step, stopped_by_time=stopped_by_time, minutes=(time.time() - start) / 60,
                      last_eval=last_eval)


@contextlib.contextmanager
def _drawn(curves: Optional[TrainingCurves]):
    """Draw the curves once more when the loop ends, however it ends, and close the TensorBoard writer."""
    try:
        yield
    finally:
        if curves is not None:
            curves.close()
            curves.draw()


class StopSignals:
    """SIGTERM (what schedulers send before they kill a job) and SIGINT (Ctrl-C) while training: the first one is
    noted in `received` for the loop to stop at the end of its step; it also puts back the default actions, so a
    second one ends the process at once. Outside the main thread (where signals cannot be caught) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DEFAULTS = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        for s, action in self.DEFAULTS.items():
            signal.signal(s, action)
        log.warning("%s received: stopping after this step and saving a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, action in self.previous.items():
            signal.signal(s, action)


def _mean(values) -> float:
    return sum(float(v) for v in values) / len(values)


class LossHealth:
    """The first step with a non-finite loss, kept on the loss's device (watching costs no host synchronisation);
    `check` reads it back and raises."""

    def __init__(self):
        self.first_bad: Optional[torch.Tensor] = None

    def watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.long, device=loss.device)
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)

    def check(self) -> None:
        if self.first_bad is not None and int(self.first_bad):
            raise DifflmError(f"the loss became NaN or infinite at step {int(self.first_bad)}; lower the learning "
                              f"rate")


def _stop_agreed(time_up: bool, signalled: bool, cfg: LoopConfig, step: int):
    """(stop for the time limit, stop for a signal). One process decides every step; under a launcher the ranks
    agree (a collective that waits for the device) every `log_every` steps, at the same steps on every rank, so
    that all of them stop, and save, at one step."""
    if world_size() == 1:
        return time_up, signalled
    if step % cfg.log_every:
        return False, False
    return tuple(_all_ranks_agree([time_up, signalled]))


CHECKPOINT_FORMAT = 2


def _all_ranks_agree(flags: List[bool]) -> List[bool]:
    """Each flag true on every rank when it is true on any."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(out: Path, weights: Optional[dict], ema: EMA, engine, tokenizer, step: int, cfg: Config,
                    data: BatchStream, generator: torch.Generator, card: str = "", seconds: float = 0.0) -> None:
    """Called by every rank. The EMA model for generation (`model/`, with its model `card`) and the full training state
    (`checkpoint/`): weights, EMA, the engine's optimizer and schedule (DeepSpeed's collective checkpoint under
    a launcher), and each rank's data position and RNGs, so that `--resume` continues the same trajectory.
    Everything is written into `.checkpoint.partial` first; rank 0 renames it into place when all ranks are done."""
    main = rank() == 0
    tmp, final = out / ".checkpoint.partial", out / "checkpoint"
    if main:
        save_model(ema.model, tokenizer, out / "model",
                   extra_files={TRAINING_CONFIG: config_yaml(cfg), **({CARD: card} if card else {})})
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "engine").mkdir(parents=True)
    _barrier()
    engine.save_state(tmp / "engine")
    torch.save({"data": data.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rank{rank()}.pt")
    _barrier()
    if main:
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, "model": weights, "ema": ema.model.state_dict(),
                    "config": cfg.to_dict(), "world_size": world_size(), "train_seconds": seconds},
                   tmp / "trainer_state.pt")  # written last: its presence marks a complete checkpoint
        old = out / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_checkpoint(cfg: Config) -> dict:
    """The training state saved in `<out_dir>/checkpoint` for this rank of a run of `cfg`, or a one-line error
    saying what is wrong with it (missing, corrupt, another config or another number of processes)."""
    out = Path(cfg.train.out_dir)
    folder = out / "checkpoint"
    if not (folder / "trainer_state.pt").is_file():
        raise DifflmError(f"nothing to resume in {out}: no checkpoint/trainer_state.pt (train without --resume first)")
    try:
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
        state.update(torch.load(folder / f"rank{rank()}.pt", map_location="cpu", weights_only=False))
    except Exception as e:  # missing, truncated or overwritten files fail inside pickle/zip in many ways
        raise DifflmError(f"checkpoint {folder} is corrupt or partial ({type(e).__name__}); delete it to start over "
                          f"or restore a good copy") from None
    missing = {"format", "step", "model", "ema", "config", "world_size", "data", "generator", "torch_rng"} - set(state)
    if missing or state.get("format") != CHECKPOINT_FORMAT:
        raise DifflmError(f"checkpoint {folder} is not a difflm checkpoint of format {CHECKPOINT_FORMAT} "
                          f"(missing {', '.join(sorted(missing)) or 'nothing'})")
    if state["world_size"] != world_size():
        raise DifflmError(f"checkpoint {folder} was written by {state['world_size']} processes; resume it with as "
                          f"many (this run has {world_size()})")
    changed = _config_changes(state["config"], cfg)
    if changed:
        raise DifflmError(f"--resume needs the checkpoint's config; these differ: {', '.join(changed)}")
    state["folder"] = folder
    return state


def _config_changes(saved: dict, cfg: Config) -> list:
    """Keys of the training sections whose values differ between a checkpoint's config and this run's
    (but RESUMABLE_CHANGES)."""
    now = cfg.to_dict()
    return [f"{sec}.{key}" for sec in ("data", "model", "diffusion", "train") for key, value in now[sec].items()
            if saved.get(sec, {}).get(key) != value and f"{sec}.{key}" not in RESUMABLE_CHANGES]


# keys a resumed run may change: a safety net, logging, and the CPU threads of the machine it continues on (the
# trajectory then matches the uninterrupted one to float rounding rather than bit for bit)
RESUMABLE_CHANGES = {"train.max_minutes", "train.tensorboard", "train.threads"}


def restore(state: dict, cfg: Config, model, ema: EMA, engine, data: BatchStream, generator: torch.Generator,
            metrics_path: Path) -> int:
    """Put a run back where `state` left it; returns the step to continue from."""
    if not engine.restores_weights:
        model.load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema"])
    engine.load_state(state["folder"] / "engine")
    data.load_state_dict(state["data"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    step = state["step"]
    if metrics_path.is_file():  # drop what was logged after the checkpoint
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    log.info("resuming from step %d of %s", step, state["folder"])
    return step
