"""Optimizer engines behind the training loop: plain PyTorch, and DeepSpeed (the only importer of deepspeed).

An engine owns the optimizer and LR schedule; `step(loss)` takes one micro-batch's loss through backward, and on
every `accumulation`-th call also clips, updates and steps the schedule, returning the gradient norm (a tensor or
a float; None between updates), reading no value back to the host (DeepSpeed's ZeRO-1/2 optimizer itself does,
for its overflow check). `autocast()` is the precision of the forward. The DeepSpeed config is generated from the
training config; a user's DeepSpeed JSON may add to it, but may not contradict it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

import torch

from .config import LoopConfig, TrainConfig
from .errors import DifflmError
from .precision import DTYPES, autocast, check_precision
from .runtime import world_size

log = logging.getLogger("difflm")
ENGINES = ("torch", "deepspeed")


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up over warmup_steps, then linear decay to zero at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


LR_GROUPS = ("embedding", "schedule")  # the parameter groups a model may name in `lr_groups()`; train.<name>_lr


def param_groups(model: torch.nn.Module, cfg: LoopConfig) -> list:
    """AdamW's parameter groups. Where the config sets train.embedding_lr or train.schedule_lr (TrainConfig; 0
    means train.lr), the parameters a submodule lists under that name in its `lr_groups()` get that learning rate
    and no weight decay; everything else gets train.lr and train.weight_decay. Plaid (Gulrajani & Hashimoto 2023)
    trains its embeddings and noise schedule at 1e-2 beside a network at 1.4e-3: both sit behind the ELBO's
    weak, noisy gradient. The warm-up/decay factor applies to every group alike."""
    rates = {name: getattr(cfg, f"{name}_lr", 0.0) for name in LR_GROUPS}
    chosen = {}  # id(parameter) -> group name
    for module in model.modules():
        named = getattr(module, "lr_groups", None)
        for name, params in (named() if callable(named) else {}).items():
            if rates[name]:
                chosen.update((id(p), name) for p in params)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in chosen]}]
    for name, rate in rates.items():
        own = [p for p in params if chosen.get(id(p)) == name]
        if own:
            groups.append({"params": own, "lr": rate, "weight_decay": 0.0})
    return groups


def _optimizer(model: torch.nn.Module, cfg: LoopConfig, fused: Optional[bool] = None):
    """AdamW (betas (0.9, train.adam_beta2); fused on CUDA unless told) over `param_groups` and the warm-up/decay
    schedule."""
    fused = next(model.parameters()).is_cuda if fused is None else fused
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay, fused=fused)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


class TorchEngine:
    """Plain PyTorch: AdamW, LR warm-up then linear decay to zero at max_steps, gradient-norm clipping, gradient
    accumulation over `grad_accum` micro-batches, bf16 autocast."""

    def __init__(self, model: torch.nn.Module, cfg: LoopConfig, fused: Optional[bool] = None):
        self.model, self.cfg = model, cfg
        self.optimizer, self.scheduler = _optimizer(model, cfg, fused)
        self.bf16 = getattr(cfg, "precision", "fp32") == "bf16"
        self.accumulation, self._micro = getattr(cfg, "grad_accum", 1), 0

    def autocast(self):
        """bf16 autocast around the forward when train.precision=bf16 (weights and optimizer stay fp32)."""
        return autocast(next(self.model.parameters()).device.type, torch.bfloat16 if self.bf16 else None)

    def step(self, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """Backward of one micro-batch's loss; every `accumulation`-th call also clips and updates, and returns
        the gradient norm as a 0-dim tensor (no host synchronisation: the loop reads it when it logs)."""
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()
        self._micro += 1
        if self._micro % self.accumulation:
            return None
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    restores_weights = False  # load_state restores the optimizer; the loop loads the weights

    def gathered(self, params):
        return contextlib.nullcontext()

    def save_state(self, folder: Path) -> None:
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "engine.pt")

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / "engine.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON implied by the training config; `engine_config` checks the precision first. The
    optimizer and LR schedule are passed as torch objects (AdamW and the warm-up/decay LambdaLR), so that no
    DeepSpeed op needs a JIT build."""
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # DeepSpeed's default (true) swaps torch.nn.functional.linear for its own autograd function for the rest of
        # the process ("persists unless manually reset"): every later linear layer, of any model, then adds in
        # another order (seen: runs after an in-process ZeRO-3 engine drifted by 1e-6 from a fresh process's)
        zero["memory_efficient_linear"] = False
    offload = {}
    if cfg.offload_optimizer:
        if cfg.zero_stage == 0:
            raise DifflmError("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu"}
        # torch's AdamW then steps on the CPU copy; DeepSpeed would insist on its JIT-compiled CPU Adam
        offload = {"zero_force_ds_cpu_optimizer": False}
    if cfg.offload_params:
        if cfg.zero_stage != 3:
            raise DifflmError("train.offload_params needs train.zero_stage 3")
        zero["offload_param"] = {"device": "cpu"}
    # bf16 is torch autocast over fp32 weights, as in the torch engine, unless train.cast_weights asks for
    # DeepSpeed's own mode (weights and gradients cast, fp32 master weights in the optimizer). fp16 always takes
    # DeepSpeed's own mode: under its torch-autocast fp16, ZeRO-1/2 clip the gradients while the GradScaler's
    # factor is still in them (norm x 65536), seen on CPU
    cast = cfg.precision == "fp16" or (cfg.cast_weights and cfg.precision == "bf16")
    amp = cfg.precision != "fp32" and not cast
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size(),
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cast and cfg.precision == "bf16"},
        "fp16": {"enabled": cast and cfg.precision == "fp16"},
        "torch_autocast": {"enabled": amp, "dtype": "float16" if cfg.precision == "fp16" else "bfloat16"},
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        **offload,
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def merge_user_config(generated: dict, path: str) -> dict:
    """The generated config with a user's DeepSpeed JSON laid over it; keys that the training config decides
    must agree with it (each disagreement is named)."""
    p = Path(path)
    if not p.is_file():
        raise DifflmError(f"DeepSpeed config {path} does not exist")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DifflmError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise DifflmError(f"DeepSpeed config {path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise DifflmError(f"DeepSpeed config {path} sets {key!r}; difflm sets the optimizer and schedule from "
                              f"train.lr, train.weight_decay, train.warmup_steps and train.max_steps")
    ours, theirs = _flatten(generated), _flatten(user)
    clashes = [f"{k}={theirs[k]!r} (training config: {ours[k]!r})" for k in theirs
               if k in ours and k not in ("steps_per_print", "wall_clock_breakdown") and theirs[k] != ours[k]]
    if clashes:
        raise DifflmError(f"DeepSpeed config {path} contradicts the training config: {'; '.join(clashes)}; "
                          f"drop those keys from the JSON or change the training config")
    merged = json.loads(json.dumps(generated))
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_distributed_env() -> None:
    """A single process run without a launcher: set what torch.distributed needs (else DeepSpeed looks for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


class DeepSpeedEngine:
    """DeepSpeed's engine around the same torch AdamW and schedule (ZeRO stages 0-3, bf16/fp16, offload,
    gradient accumulation)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        import deepspeed

        ensure_distributed_env()
        # skip the shared-memory communication op: its JIT build costs ~50 s and single-node CPU runs do not need it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_config = engine_config(cfg)
        amp = ds_config.get("torch_autocast", {})
        self.autocast_dtype = DTYPES[cfg.precision] if amp.get("enabled") else None
        if self.autocast_dtype is None:  # DeepSpeed keeps "autocast is on" in a module global once any engine set it
            deepspeed.runtime.torch_autocast.TORCH_AUTOCAST_INITIALIZED = False
        optimizer, scheduler = _optimizer(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.model, self.stage, self.accumulation = self.engine.module, cfg.zero_stage, cfg.grad_accum
        # ZeRO-0 over fp32 weights clips through torch and keeps no norm: measure it here (one multi-tensor pass)
        self.own_norm = self.stage == 0 and not ds_config["bf16"]["enabled"] and not ds_config["fp16"]["enabled"]
        if self.stage == 3 and hasattr(model, "external_parameters"):
            for p in model.external_parameters():  # used outside their own module's forward (tied heads)
                deepspeed.zero.register_external_parameter(model, p)
        log.info("deepspeed: ZeRO stage %d, %s, micro-batch %d x accumulation %d x %d processes", cfg.zero_stage,
                 cfg.precision, cfg.batch_size, cfg.grad_accum, world_size())

    def step(self, loss: torch.Tensor):
        """Backward of one micro-batch; DeepSpeed updates on every `accumulation`-th call, and then the gradient
        norm is returned (a float or a 0-dim tensor; None between updates)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        own = None
        if boundary and self.own_norm:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            own = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        self.engine.step()
        if not boundary:
            return None
        norm = own if self.own_norm else self.engine.get_global_grad_norm()
        return float("nan") if norm is None else norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    restores_weights = True  # DeepSpeed's checkpoint carries the (partitioned) module weights

    def autocast(self):
        """torch autocast as DeepSpeed's `torch_autocast` section says (the loss module is called directly, not
        through the DeepSpeed engine's forward); with train.cast_weights the weights are bf16/fp16 themselves."""
        return autocast(next(self.model.parameters()).device.type, self.autocast_dtype)

    def gathered(self, params):
        """Full parameters inside the block (a collective under ZeRO-3: every rank must enter it)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def save_state(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine")

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="engine")
        if path is None:
            raise DifflmError(f"no DeepSpeed engine state in {folder}; the checkpoint is partial")


def engine_config(cfg: TrainConfig):
    """Check the engine settings (before any data is loaded); the DeepSpeed JSON for the deepspeed engine."""
    if cfg.engine not in ENGINES:
        raise DifflmError(f"train.engine {cfg.engine!r} is not available; choose one of {', '.join(ENGINES)}")
    if cfg.precision != "fp16":  # fp16 is checked below, once the torch engine has said it does not take it
        check_precision(cfg.precision, "train.precision")
    if cfg.engine == "torch":
        if world_size() > 1:
            raise DifflmError("several processes need train.engine=deepspeed (the torch engine is one process)")
        if cfg.precision == "fp16" or cfg.cast_weights or cfg.deepspeed_config or cfg.zero_stage:
            raise DifflmError("train.precision=fp16, train.cast_weights, train.zero_stage and train.deepspeed_config "
                              "apply to train.engine=deepspeed; the torch engine trains fp32 or bf16 autocast")
        return None
    if cfg.cast_weights and cfg.precision == "fp32":
        raise DifflmError("train.cast_weights needs train.precision=bf16 or fp16 (it casts the weights to it)")
    if cfg.compile and cfg.zero_stage == 3:
        raise DifflmError("train.compile does not work with ZeRO-3 (its parameter hooks break the compiled graph); "
                          "use train.zero_stage 0, 1 or 2, or train.compile=false")
    ds_config = deepspeed_config(cfg)
    if cfg.precision == "fp16":
        check_precision(cfg.precision, "train.precision")
        if not deepspeed_has_fp16():
            raise DifflmError("train.precision=fp16: DeepSpeed finds no fp16 support on this device; use bf16 or fp32")
    if cfg.deepspeed_config:
        ds_config = merge_user_config(ds_config, cfg.deepspeed_config)
    return ds_config


def deepspeed_has_fp16() -> bool:
    """DeepSpeed's own answer (its accelerator's), which its engine checks at start: on a CPU it asks whether
    oneDNN has fp16 kernels, which many x86 CPUs (AVX2-only ones, for instance) lack."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().is_fp16_supported()


def make_engine(model: torch.nn.Module, cfg: TrainConfig):
    return DeepSpeedEngine(model, cfg) if cfg.engine == "deepspeed" else TorchEngine(model, cfg)
