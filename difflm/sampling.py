"""Samplers over a GaussianDiffusion and a model_fn: ancestral (DDPM) and DDIM, as plain functions.

Both are one update (Song et al. 2021, DDIM eq. 12): from x_t, with x0_hat the model's denoised estimate and
eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma^2 = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s).

eta = 1 makes this a draw from the posterior q(x_s | x_t, x0 = x0_hat): ancestral sampling (DDPM), respaced
when steps < T. eta = 0 is deterministic DDIM. The last step returns x0_hat itself.

Hooks: `denoise_fn(x0_hat, t) -> x0_hat` transforms each x0 estimate (Diffusion-LM's clamping trick);
`guide(StepState) -> x_s` may move the proposed x_s (classifier guidance); `callback(StepState)` observes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .diffusion import GaussianDiffusion, ModelFn, _bcast
from .errors import DifflmError


@dataclass
class StepState:
    """One sampler step from time t to time s < t (s = 0 on the last step)."""

    index: int  # 0 for the first (noisiest) step
    num_steps: int
    t: torch.Tensor  # (B,)
    s: torch.Tensor  # (B,)
    x_t: torch.Tensor
    x0_hat: torch.Tensor
    x_s: torch.Tensor  # the proposed next latent (x0_hat on the last step)
    mean: torch.Tensor  # mean of p(x_s | x_t)
    var: torch.Tensor  # variance of p(x_s | x_t) (broadcastable)


def time_grid(diffusion: GaussianDiffusion, steps: Optional[int], option: str = "--steps") -> torch.Tensor:
    """Decreasing sampling times t_K > .. > t_1, ending at the first latent (1/T, or t_min in continuous time).
    `option` names the setting that gave `steps` in the error for a count the grid cannot make."""
    if diffusion.discrete:
        total = diffusion.num_steps
        steps = total if steps is None else steps
        if not 1 <= steps <= total:
            raise DifflmError(f"{option} must be between 1 and the model's {total} diffusion steps, got {steps}")
        idx = torch.unique(torch.round(torch.linspace(total, 1, steps, dtype=torch.float64)))
        return torch.flip(idx, [0]) / total
    if steps is None or steps < 1:
        raise DifflmError(f"a continuous-time model needs {option} (a positive number of sampling steps)")
    t_end = max(diffusion.t_min, 1e-4)
    return torch.linspace(1.0, t_end, steps, dtype=torch.float64)


def check_request(diffusion: GaussianDiffusion, num_samples: int, steps: Optional[int], batch_size: int,
                  steps_option: str = "--steps") -> None:
    """One-line errors for a sampling request the model cannot serve, to be called before any output."""
    if num_samples < 1:
        raise DifflmError(f"--num-samples must be positive, got {num_samples}")
    if batch_size < 1:
        raise DifflmError(f"--batch-size must be positive, got {batch_size}")
    time_grid(diffusion, steps, steps_option)  # a step count the grid cannot make


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, steps: Optional[int] = None, eta: float = 1.0,
           denoise_fn: Optional[Callable] = None, guide: Optional[Callable] = None,
           callback: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
           device="cpu", dtype=torch.float32, x_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw x0 ~ p(x0) by `steps` updates of the DDIM family (module docstring) from x_T ~ N(0, I)."""
    times = time_grid(diffusion, steps).tolist() + [0.0]
    b = shape[0]
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    for k in range(len(times) - 1):
        t = torch.full((b,), times[k], device=device, dtype=dtype)
        s = torch.full((b,), times[k + 1], device=device, dtype=dtype)
        x0_hat = diffusion.predict_x0(model_fn(x, t), x, t)
        if denoise_fn is not None:
            x0_hat = denoise_fn(x0_hat, t)
        if k == len(times) - 2:
            mean, var, x_s = x0_hat, torch.zeros_like(x0_hat[:1]), x0_hat
        else:
            a_t, a_s = _bcast(diffusion.alpha_bar(t), x), _bcast(diffusion.alpha_bar(s), x)
            eps_hat = (x - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
            var = eta ** 2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            mean = a_s.sqrt() * x0_hat + (1 - a_s - var).clamp(min=0).sqrt() * eps_hat
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
            x_s = mean + var.sqrt() * z
        state = StepState(k, len(times) - 1, t, s, x, x0_hat, x_s, mean, var)
        if guide is not None:
            state.x_s = guide(state)
        if callback is not None:
            callback(state)
        x = state.x_s
    return x


def ddpm_sample(diffusion, model_fn, shape, steps=None, **kwargs):
    """Ancestral sampling: each step draws from q(x_s | x_t, x0_hat) (eta = 1)."""
    return sample(diffusion, model_fn, shape, steps=steps, eta=1.0, **kwargs)


def ddim_sample(diffusion, model_fn, shape, steps=None, eta: float = 0.0, **kwargs):
    """DDIM (Song et al. 2021); eta = 0 is deterministic given x_T."""
    return sample(diffusion, model_fn, shape, steps=steps, eta=eta, **kwargs)
