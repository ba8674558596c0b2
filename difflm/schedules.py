"""Noise schedules as functions of continuous time t in [0, 1].

A schedule defines the signal level alpha_bar(t) of the variance-preserving forward process
q(x_t | x_0) = N(sqrt(alpha_bar(t)) x_0, (1 - alpha_bar(t)) I)   (Luo 2022, eq. 61),
equivalently its log signal-to-noise ratio log_snr(t) = log(alpha_bar / (1 - alpha_bar)) (Kingma et al. 2021).

A discrete process with T steps uses the grid t_i = i / T, i = 1..T. `discretize` builds that grid the way
DDPM-family code (and Diffusion-LM) does: beta_i = min(1 - alpha_bar(t_i) / alpha_bar(t_{i-1}), max_beta) and
alpha_bar_i = prod_{j<=i} (1 - beta_j), with alpha_bar(t_0) taken as 1 (x_0 is the data). Where no beta is
clipped this equals alpha_bar(t_i).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .errors import DifflmError, check_choice


class Schedule(nn.Module):
    """Base class: subclasses implement `alpha_bar(t)` for t in [0, 1] (or `log_snr`)."""

    name: str = ""
    max_beta: float = 0.999
    # the bound's time strata (GaussianDiffusion.time_strata): geometric towards t = 0, where the ELBO's weight
    # -SNR'(t) of these schedules concentrates, or (EndpointSchedule) uniform in t
    uniform_strata: bool = False

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.log_snr(t))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def discretize(self, num_steps: int) -> torch.Tensor:
        """alpha_bar at t_i = i/T for i = 1..T, float64, with each beta clipped at `max_beta`."""
        grid = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        a = self._grid_level(grid).to(torch.float64)
        a[0] = 1.0
        betas = torch.clamp(1.0 - a[1:] / a[:-1], max=self.max_beta)
        return torch.cumprod(1.0 - betas, dim=0)

    def _grid_level(self, grid: torch.Tensor) -> torch.Tensor:
        """The function whose ratios give the discrete betas (alpha_bar itself unless a subclass says)."""
        return self.alpha_bar(grid)

    @property
    def learnable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


class Linear(Schedule):
    """Linear beta(t) of the VP SDE (Song et al. 2021): alpha_bar(t) = exp(-(b0 t + (b1 - b0) t^2 / 2)).

    With T = 1000 its grid matches DDPM's betas linspace(1e-4, 0.02, T) to first order.
    """

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        super().__init__()
        self.beta_min, self.beta_max = beta_min, beta_max

    def alpha_bar(self, t):
        return torch.exp(-(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t))


class Cosine(Schedule):
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t) / f(0),
    f(t) = cos^2((t + s) / (1 + s) * pi / 2)."""

    name = "cosine"

    def __init__(self, offset: float = 0.008):
        super().__init__()
        self.offset = offset

    def _f(self, t):
        return torch.cos((t + self.offset) / (1 + self.offset) * math.pi / 2) ** 2

    def alpha_bar(self, t):
        t = torch.as_tensor(t)
        return self._f(t) / self._f(torch.zeros_like(t))


class Sqrt(Schedule):
    """Diffusion-LM's schedule (Li et al. 2022, sec. 4.2): alpha_bar(t) = 1 - sqrt(t + s), s = 1e-4.

    Diffusion-LM discretizes it with `betas_for_alpha_bar(T, lambda t: 1 - sqrt(t + 1e-4))`, i.e. the generic
    `discretize` with beta clipped at 0.999; as a continuous process we use the same function normalised by its
    value at 0, which is what the discrete grid converges to. Past t = 1 - s the function is negative: there the
    level is floored at `floor` (the clipped discrete grid ends at a comparably tiny alpha_bar).
    """

    name = "sqrt"

    def __init__(self, offset: float = 1e-4, floor: float = 1e-8):
        super().__init__()
        self.offset, self.floor = offset, floor

    def _f(self, t):
        return 1.0 - torch.sqrt(t + self.offset)

    def alpha_bar(self, t):
        t = torch.as_tensor(t)
        return torch.clamp(self._f(t) / self._f(torch.zeros_like(t)), min=self.floor)

    def _grid_level(self, grid):
        # the raw function, exactly as Diffusion-LM feeds it to betas_for_alpha_bar: normalised by f(0) (as
        # alpha_bar) but not floored, so that the negative values past t = 1 - s clip the last betas as there
        return self._f(grid) / self._f(torch.zeros_like(grid))


class EndpointSchedule(Schedule):
    """A log-SNR with explicit endpoints: log_snr(t) = log_snr_max - (log_snr_max - log_snr_min) u(t), where the
    "unit" schedule u rises monotonically from u(0) = 0 to u(1) = 1. The split is what the ELBO objective needs
    (Kingma et al. 2021, appendix I.2; Plaid): the continuous-time ELBO depends on the schedule only through its
    endpoints, so they get the loss's own gradient while u's parameters (if any) get the gradient of the loss's
    variance (`GaussianDiffusion.noise_level`).

    The ELBO's weight -SNR'(t) is bounded here (finite log_snr(0)), and a learned shape spreads the diffusion term
    evenly over t (its variance-minimizing gradient flattens the integrand), so the bound's strata are uniform:
    geometric ones spent three quarters of their draws below t = 0.09, where a learned E2E schedule puts 0.01% of
    the nats (docs/benchmarks.md)."""

    uniform_strata = True

    def endpoints(self):
        """(log_snr_max, log_snr_min) as tensors (differentiable where learned)."""
        raise NotImplementedError

    def unit(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_unit(self, u: torch.Tensor, du: torch.Tensor):
        """(log_snr, d log_snr / dt) from u(t) and du/dt."""
        hi, lo = self.endpoints()
        return hi - (hi - lo) * u, -(hi - lo) * du

    def log_snr(self, t):
        t = torch.as_tensor(t)
        hi, lo = self.endpoints()
        return hi - (hi - lo) * self.unit(t)


class LogSNRLinear(EndpointSchedule):
    """log_snr(t) linear from `log_snr_max` at t=0 to `log_snr_min` at t=1 (VDM's fixed baseline schedule).

    Unlike the others it keeps a finite SNR at t = 0, so the continuous-time ELBO needs no t_min.
    """

    name = "logsnr-linear"

    def __init__(self, log_snr_max: float = 10.0, log_snr_min: float = -10.0):
        super().__init__()
        self.log_snr_max, self.log_snr_min = log_snr_max, log_snr_min

    def endpoints(self):
        return (torch.tensor(self.log_snr_max, dtype=torch.float64),
                torch.tensor(self.log_snr_min, dtype=torch.float64))

    def unit(self, t):
        return t


class _PositiveLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, nn.functional.softplus(self.weight), self.bias)


class Learned(EndpointSchedule):
    """Learned monotone log-SNR (Kingma et al. 2021, appendix H): gamma(t) = -log_snr(t) is a monotone network
    l1(t) + l3(phi(l2(l1(t)))) with positive weights, rescaled so that log_snr(0) = log_snr_max and
    log_snr(1) = log_snr_min (both learnable endpoints: gamma_0 = -log_snr_max, gamma_1 = -log_snr_min).

    With `log_snr_max_floor` f the upper endpoint is log_snr(0) = f + softplus(r) (r learned in place of gamma_0),
    so that training cannot drive z_0 below that signal-to-noise ratio: with the length given
    (config.explicit_length) the ELBO otherwise finds a shortcut in log_snr(0) -> -inf, where the whole bound
    moves into a one-shot reconstruction that stops learning (docs/benchmarks.md)."""

    name = "learned"

    def __init__(self, log_snr_max: float = 10.0, log_snr_min: float = -10.0, hidden: int = 1024,
                 log_snr_max_floor: Optional[float] = None):
        super().__init__()
        self.floor = log_snr_max_floor
        if log_snr_max_floor is None:
            self.gamma_0 = nn.Parameter(torch.tensor(-float(log_snr_max)))
        elif not log_snr_max > log_snr_max_floor:
            raise DifflmError(f"the learned schedule's log_snr_max ({log_snr_max:g}) must start above its floor "
                              f"({log_snr_max_floor:g})")
        else:  # r = softplus^-1(log_snr_max - f)
            excess = torch.tensor(float(log_snr_max) - log_snr_max_floor, dtype=torch.float64)
            self.log_snr_max_excess = nn.Parameter((excess + torch.log(-torch.expm1(-excess))).float())
        self.gamma_1 = nn.Parameter(torch.tensor(-float(log_snr_min)))
        self.l1 = _PositiveLinear(1, 1)
        self.l2 = _PositiveLinear(1, hidden)
        self.l3 = _PositiveLinear(hidden, 1, bias=False)
        with torch.no_grad():
            self.l3.weight.fill_(-10.0)  # softplus(-10) ~ 0: starts as the linear log-SNR schedule

    def _gamma_tilde(self, t):
        h = self.l1(t[..., None])
        return (h + self.l3(torch.sigmoid(self.l2(h))))[..., 0]

    def endpoints(self):
        if self.floor is None:
            return -self.gamma_0, -self.gamma_1
        return self.floor + nn.functional.softplus(self.log_snr_max_excess), -self.gamma_1

    def unit(self, t):
        t = torch.as_tensor(t, dtype=self.gamma_1.dtype, device=self.gamma_1.device)
        g0, g1 = self._gamma_tilde(torch.zeros_like(t)), self._gamma_tilde(torch.ones_like(t))
        return (self._gamma_tilde(t) - g0) / (g1 - g0)

    def discretize(self, num_steps: int) -> torch.Tensor:
        grid = torch.arange(1, num_steps + 1, dtype=self.gamma_1.dtype, device=self.gamma_1.device) / num_steps
        return self.alpha_bar(grid)

    def check_endpoints(self, where: str = "") -> None:
        """A one-line error where training moved the endpoints across each other (log_snr(0) <= log_snr(1))."""
        hi, lo = (v.item() for v in self.endpoints())
        if not hi > lo:
            raise DifflmError(f"{where or 'the learned schedule'}: log-SNR endpoints crossed (log_snr(0) = {hi:.4g} "
                              f"is not above log_snr(1) = {lo:.4g}); the noise would fall as t grows. Retrain, "
                              f"e.g. with a lower train.lr")


class NoiseScaled(Schedule):
    """A schedule whose noise is `noise_scale` (F) times stronger relative to the signal (Difformer's noise factor,
    Gao et al. 2022, in variance-preserving form): SNR(t) = SNR_base(t) / F^2, i.e.
    log_snr(t) = log_snr_base(t) - 2 log F. F > 1 keeps more noise at small t, where embeddings of large norm
    would otherwise be all but noise-free (the denoiser's task there trivial)."""

    def __init__(self, base: Schedule, noise_scale: float):
        super().__init__()
        self.base, self.shift = base, -2.0 * math.log(noise_scale)
        self.name, self.uniform_strata = base.name, base.uniform_strata

    def log_snr(self, t):
        return self.base.log_snr(t) + self.shift


SCHEDULES = {cls.name: cls for cls in (Linear, Cosine, Sqrt, LogSNRLinear, Learned)}
# the schedules whose log-SNR endpoints are parameters
ENDPOINT_SCHEDULES = tuple(name for name, cls in SCHEDULES.items() if issubclass(cls, EndpointSchedule))


def get_schedule(name: str, log_snr_max: float = 10.0, log_snr_min: float = -10.0,
                 noise_scale: float = 1.0, log_snr_max_floor: Optional[float] = None) -> Schedule:
    """The schedule called `name`; `log_snr_max` / `log_snr_min` are the log-SNR at t = 0 and t = 1 of those that
    take endpoints (ENDPOINT_SCHEDULES), `log_snr_max_floor` a floor on the learned log_snr(0) (Learned only),
    and `noise_scale` != 1 wraps it in NoiseScaled."""
    check_choice("schedule", name, SCHEDULES)
    if log_snr_max_floor is not None and name != Learned.name:
        raise DifflmError(f"a floor on log_snr(0) is for the learned schedule; schedule {name!r} has fixed endpoints")
    if name == Learned.name:
        schedule = Learned(log_snr_max, log_snr_min, log_snr_max_floor=log_snr_max_floor)
    else:
        schedule = SCHEDULES[name](log_snr_max, log_snr_min) if name in ENDPOINT_SCHEDULES else SCHEDULES[name]()
    return schedule if noise_scale == 1.0 else NoiseScaled(schedule, noise_scale)
