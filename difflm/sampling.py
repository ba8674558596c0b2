"""Samplers over a GaussianDiffusion and a model_fn that estimates x0: DDPM, DDIM and DPM-Solver++, on a time grid.

**DDIM family** (Song et al. 2021, DDIM eq. 12): from x_t, with x0_hat the model's denoised estimate and
eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t),

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
    sigma^2 = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s).

eta = 1 makes this a draw from the posterior q(x_s | x_t, x0 = x0_hat): ancestral sampling (DDPM), respaced
when steps < T. eta = 0 is deterministic DDIM. eta > 1 adds more noise than the posterior, which corrects more of
each step's error at a few steps; sigma^2 is capped at 1 - abar_s, where the step becomes x_s ~ q(x_s | x0 = x0_hat)
(the estimate re-noised from scratch, x_t forgotten).

**DPM-Solver++** (Lu et al. 2022, "DPM-Solver++", multistep): with alpha = sqrt(abar), sigma = sqrt(1 - abar) and
lambda = log(alpha / sigma) (half the log-SNR), the probability-flow ODE in its data-prediction form has the exact
solution (their eq. 9)

    x_s = (sigma_s / sigma_t) x_t + alpha_s * integral_0^h e^(tau - h) x0(lambda_t + tau) d tau,  h = lambda_s - lambda_t.

The order-m solver replaces x0(lambda) by the polynomial in lambda through the last m estimates x0_hat (at this
step's and the previous steps' lambda) and integrates it exactly: with I_j = integral_0^h e^(tau - h) tau^j d tau
(I_0 = 1 - e^-h, I_j = h^j - j I_{j-1}), the step is x_s = (sigma_s / sigma_t) x_t + alpha_s sum_i w_i x0_hat_i,
the weights w solving V^T w = I for the Vandermonde matrix V_ij = (lambda_i - lambda_t)^j. Order 1 is DDIM
(eta = 0) exactly; order 2 is DPM-Solver++(2M) with the first-derivative term's coefficient integrated exactly
(h - 1 + e^-h) where the paper's Algorithm 2 takes (1 - e^-h) h / 2, equal to second order; order 3 is the
three-step analogue. The first steps use the order the history allows. Only the alphas at the grid's times
enter, so a discrete-time model is solved exactly on its trained steps.

**Time grids** (`time_grid`): uniform in t; uniform in log-SNR (from LOGSNR_GRID_FLOOR or the log-SNR at t = 1, if
higher, to the first latent's; the first step still starts at t = 1); or `warp`: through a time-warping CDF F learned in
training (diffusion.TimeWarp), t_k = F^-1(u_k) for u uniform, so the steps go where the denoising loss changes.
A discrete-time model's grid holds distinct trained steps i/T only. Every sampler's last step returns x0_hat.

Hooks: `denoise_fn(x0_hat, t) -> x0_hat` transforms each x0 estimate (Diffusion-LM's clamping trick);
`guide(StepState) -> x_s` may move the proposed x_s (classifier guidance); `callback(StepState)` observes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .diffusion import GaussianDiffusion, ModelFn, TimeWarp, _bcast
from .errors import DifflmError, check_choice

SAMPLERS = ("ddpm", "ddim", "dpm++")
GRIDS = ("uniform", "logsnr", "warp")
MAX_ORDER = 3
# The log-SNR grid's noisiest level: below it the data is drowned (SNR < 5e-5) and the ODE all but linear. A sqrt or
# cosine schedule's log-SNR at t = 1 lies far lower (-15 to -75): spaced from there, most steps would go to pure
# noise. -10 is the linear VP schedule's log-SNR at t = 1, the range DPM-Solver's grids span.
LOGSNR_GRID_FLOOR = -10.0


@dataclass(frozen=True)
class Sampler:
    """How to sample: the update (`name`), DPM-Solver++'s `order` (1-3, default 2), DDIM's `eta` (default 0) and
    the time `grid`. Invalid combinations are refused here, with one-line errors."""

    name: str = "ddpm"
    grid: str = "uniform"
    order: Optional[int] = None
    eta: Optional[float] = None

    def __post_init__(self):
        check_choice("sampler", self.name, SAMPLERS)
        check_grid(self.grid)
        if self.order is not None:
            if self.name != "dpm++":
                raise DifflmError(f"a solver order is for dpm++; {self.name} is a first-order step (drop --order)")
            if not 1 <= self.order <= MAX_ORDER:
                raise DifflmError(f"dpm++ has orders 1 to {MAX_ORDER}, got order {self.order}")
        if self.eta is not None and self.name != "ddim":
            raise DifflmError(f"eta is DDIM's noise level; {self.name} does not take one (use sampler ddim)")
        if self.eta is not None and self.eta < 0:
            raise DifflmError(f"DDIM's eta must not be negative, got {self.eta}")

    @property
    def solver_order(self) -> int:
        return (self.order or 2) if self.name == "dpm++" else 1

    @property
    def noise(self) -> float:
        """The DDIM family's eta (1 for ancestral sampling)."""
        return 1.0 if self.name == "ddpm" else (self.eta or 0.0)

    def describe(self) -> str:
        what = f"dpm++ order {self.solver_order}" if self.name == "dpm++" else self.name
        if self.name == "ddim" and self.noise:
            what += f" eta {self.noise:g}"
        return f"{what}, {self.grid} grid"


def check_grid(grid: str) -> None:
    check_choice("time grid", grid, GRIDS)


def as_sampler(sampler: Union[str, Sampler]) -> Sampler:
    return sampler if isinstance(sampler, Sampler) else Sampler(sampler)


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
    var: torch.Tensor  # variance of p(x_s | x_t) (broadcastable; 0 for a deterministic step)


def _distinct_steps(positions: torch.Tensor, total: int) -> torch.Tensor:
    """Decreasing positions in [1, total] (the first total, the last 1) rounded to as many distinct whole steps,
    in order: each is moved by as little as keeps it apart from its neighbours."""
    p = torch.round(positions.flip(0)).long().clamp(1, total).tolist()  # increasing
    for k in range(1, len(p)):
        p[k] = max(p[k], p[k - 1] + 1)
    p[-1] = min(p[-1], total)
    for k in range(len(p) - 2, -1, -1):
        p[k] = min(p[k], p[k + 1] - 1)
    return torch.tensor(p[::-1], dtype=torch.float64)


def time_grid(diffusion: GaussianDiffusion, steps: Optional[int], option: str = "--steps", grid: str = "uniform",
              warp: Optional[TimeWarp] = None) -> torch.Tensor:
    """Decreasing sampling times t_K = 1 > .. > t_1, ending at the first latent (1/T, or t_min in continuous time),
    spaced by `grid` (module docstring; `warp` is the model's TimeWarp for grid=warp). `option` names the setting
    that gave `steps` in the error for a count the grid cannot make."""
    check_grid(grid)
    if grid == "warp" and warp is None:
        raise DifflmError("the warp grid needs a model trained with time warping (diffusion.time_warp_bins > 0); "
                          "use grid uniform or logsnr")
    f64 = torch.float64
    if diffusion.discrete:
        total = diffusion.num_steps
        steps = total if steps is None else steps
        if not 1 <= steps <= total:
            raise DifflmError(f"{option} must be between 1 and the model's {total} diffusion steps, got {steps}")
        if grid == "uniform":
            positions = torch.linspace(total, 1, steps, dtype=f64)
        elif grid == "logsnr":  # the (fractional) step where the discrete log-SNR crosses each level
            lam = diffusion.log_snr(torch.arange(1, total + 1, dtype=f64) / total).flip(0)  # increasing
            levels = torch.linspace(max(lam[0].item(), LOGSNR_GRID_FLOOR), lam[-1].item(), steps, dtype=f64)
            positions = total - _interpolate(levels, lam, torch.arange(total, dtype=f64))
        else:
            u = torch.linspace(1.0, warp.cdf(torch.tensor([1.0 / total], dtype=f64)).item(), steps, dtype=f64)
            positions = warp.inverse_cdf(u) * total
        positions[-1] = 1.0
        positions[0] = float(total)  # one step: at t = 1
        return _distinct_steps(positions, total) / total
    if steps is None or steps < 1:
        raise DifflmError(f"a continuous-time model needs {option} (a positive number of sampling steps)")
    t_end = max(diffusion.t_min, 1e-4)
    if grid == "uniform":
        times = torch.linspace(1.0, t_end, steps, dtype=f64)
    elif grid == "logsnr":
        ends = diffusion.log_snr(torch.tensor([1.0, t_end], dtype=f64))
        levels = torch.linspace(max(ends[0].item(), LOGSNR_GRID_FLOOR), ends[1].item(), steps, dtype=f64)
        times = diffusion.time_of_log_snr(levels, low=t_end)
    else:
        v_end = (t_end - diffusion.t_min) / (1 - diffusion.t_min)
        u = torch.linspace(1.0, warp.cdf(torch.tensor([v_end], dtype=f64)).item(), steps, dtype=f64)
        times = diffusion.t_min + (1 - diffusion.t_min) * warp.inverse_cdf(u)
    times[-1] = t_end
    times[0] = 1.0
    return times


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the points (xp, fp), xp increasing (numpy.interp)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * ((x - x0) / (x1 - x0)).clamp(0, 1)


def check_request(diffusion: GaussianDiffusion, num_samples: int, steps: Optional[int], batch_size: int,
                  steps_option: str = "--steps", sampler: Union[str, Sampler] = "ddpm",
                  warp: Optional[TimeWarp] = None) -> None:
    """One-line errors for a sampling request the model cannot serve, to be called before any output."""
    if num_samples < 1:
        raise DifflmError(f"--num-samples must be positive, got {num_samples}")
    if batch_size < 1:
        raise DifflmError(f"--batch-size must be positive, got {batch_size}")
    time_grid(diffusion, steps, steps_option, as_sampler(sampler).grid, warp)  # a grid the model cannot make


def dpm_solver_weights(lambdas, lam_s: float):
    """Weights w_i of the x0 estimates at `lambdas` (this step's first, then earlier ones) in the order-len(lambdas)
    DPM-Solver++ step to lam_s: x_s = (sigma_s / sigma_t) x_t + alpha_s sum_i w_i x0_i (module docstring)."""
    lam_t, m = lambdas[0], len(lambdas)
    h = lam_s - lam_t
    integrals = [-math.expm1(-h)]
    for j in range(1, m):
        integrals.append(h ** j - j * integrals[-1])
    taus = torch.tensor([lam - lam_t for lam in lambdas], dtype=torch.float64)
    vander = taus[:, None] ** torch.arange(m, dtype=torch.float64)  # (m, m): V_ij = tau_i^j
    return torch.linalg.solve(vander.T, torch.tensor(integrals, dtype=torch.float64)).tolist()


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, steps: Optional[int] = None,
           sampler: Union[str, Sampler] = "ddpm", denoise_fn: Optional[Callable] = None,
           guide: Optional[Callable] = None, callback: Optional[Callable] = None,
           generator: Optional[torch.Generator] = None, device="cpu", dtype=torch.float32,
           x_T: Optional[torch.Tensor] = None, warp: Optional[TimeWarp] = None) -> torch.Tensor:
    """Draw x0 ~ p(x0) from x_T ~ N(0, I) by `steps` network evaluations of `sampler` (module docstring)."""
    sampler = as_sampler(sampler)
    grid = time_grid(diffusion, steps, grid=sampler.grid, warp=warp)
    times = grid.tolist() + [0.0]
    levels = diffusion.alpha_bar(grid).tolist()  # abar at each time, float64
    tiny = 1e-300  # a schedule whose alpha_bar reaches 0 or 1 in float64 (cosine at t = 1) keeps a finite lambda
    lambdas = [0.5 * (math.log(max(a, tiny)) - math.log(max(1 - a, tiny))) for a in levels]
    eta, order, history = sampler.noise, sampler.solver_order, []
    b = shape[0]
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    for k in range(len(times) - 1):
        t = torch.full((b,), times[k], device=device, dtype=dtype)
        s = torch.full((b,), times[k + 1], device=device, dtype=dtype)
        x0_hat = diffusion.predict_x0(model_fn(x, t), x, t)
        if denoise_fn is not None:
            x0_hat = denoise_fn(x0_hat, t)
        zero = torch.zeros_like(x0_hat[:1])
        if k == len(times) - 2:
            mean, var, x_s = x0_hat, zero, x0_hat
        elif sampler.name == "dpm++":
            # newest first; an earlier estimate at the same log-SNR (a schedule's flat end) adds no information
            history = [(lambdas[k], x0_hat)] + [h for h in history if h[0] != lambdas[k]][: order - 1]
            weights = dpm_solver_weights([lam for lam, _ in history], lambdas[k + 1])
            a_t, a_s = levels[k], levels[k + 1]
            mean = math.sqrt((1 - a_s) / (1 - a_t)) * x + math.sqrt(a_s) * sum(w * e for w, (_, e) in
                                                                               zip(weights, history))
            var, x_s = zero, mean
        else:
            a_t, a_s = _bcast(diffusion.alpha_bar(t), x), _bcast(diffusion.alpha_bar(s), x)
            eps_hat = (x - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
            var = torch.minimum(eta ** 2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s), 1 - a_s)
            mean = a_s.sqrt() * x0_hat + (1 - a_s - var).sqrt() * eps_hat
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype) if eta else 0.0
            x_s = mean + var.sqrt() * z
        state = StepState(k, len(times) - 1, t, s, x, x0_hat, x_s, mean, var)
        if guide is not None:
            state.x_s = guide(state)
        if callback is not None:
            callback(state)
        x = state.x_s
    return x


def ddpm_sample(diffusion, model_fn, shape, steps=None, grid: str = "uniform", **kwargs):
    """Ancestral sampling: each step draws from q(x_s | x_t, x0_hat) (eta = 1)."""
    return sample(diffusion, model_fn, shape, steps=steps, sampler=Sampler("ddpm", grid), **kwargs)


def ddim_sample(diffusion, model_fn, shape, steps=None, eta: float = 0.0, grid: str = "uniform", **kwargs):
    """DDIM (Song et al. 2021); eta = 0 is deterministic given x_T."""
    return sample(diffusion, model_fn, shape, steps=steps, sampler=Sampler("ddim", grid, eta=eta), **kwargs)


def dpm_solver_sample(diffusion, model_fn, shape, steps=None, order: int = 2, grid: str = "logsnr", **kwargs):
    """DPM-Solver++ of `order` (1-3) on `grid`; deterministic given x_T."""
    return sample(diffusion, model_fn, shape, steps=steps, sampler=Sampler("dpm++", grid, order), **kwargs)
