"""The Gaussian variational diffusion model (Luo 2022; Kingma et al. 2021), independent of the data modality.

Time is continuous, t in [0, 1]. With `num_steps=T` the process is discrete: latents x_1..x_T live at
t_i = i / T and alpha_bar comes from the schedule's discrete grid; with `num_steps=None` it is continuous.
The class never owns a network: every method that needs one takes `model_fn(x_t, t) -> output`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .errors import DifflmError, check_choice
from .schedules import EndpointSchedule, Schedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("x0", "eps", "score", "v")


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-example (B,) tensor to broadcast against x (B, ...)."""
    return a.reshape(a.shape + (1,) * (x.dim() - a.dim())).to(x.dtype)


def _sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def gaussian_kl(mean1, var1, mean2, var2) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise (Luo 2022, eq. 87 for diagonal covariances)."""
    return 0.5 * (torch.log(var2) - torch.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def gaussian_log_prob(x, mean, var) -> torch.Tensor:
    """log N(x; mean, var) elementwise."""
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var)


@dataclass
class DenoiseOutput:
    """One noised training example: per-example loss (mean over data dims) and what the model saw and said."""

    loss: torch.Tensor  # (B,)
    x0_hat: torch.Tensor  # (B, ...)
    x_t: torch.Tensor  # (B, ...)
    t: torch.Tensor  # (B,)


@dataclass
class ELBOTerms:
    """Per-example terms of -ELBO in nats (each (B,)), Luo 2022 eq. 45; `total` upper-bounds -log p(x0)."""

    reconstruction: torch.Tensor  # -E_q[log p(x0 | x_1)]
    prior: torch.Tensor  # KL(q(x_T | x0) || N(0, I))
    diffusion: torch.Tensor  # sum of denoising-matching KLs (one-sample Monte Carlo over t)

    @property
    def total(self) -> torch.Tensor:
        return self.reconstruction + self.prior + self.diffusion


@dataclass
class NoiseLevel:
    """The noise level at per-example times t (continuous time): log-SNR and its slope in t, each (B,)."""

    log_snr: torch.Tensor
    slope: torch.Tensor  # d log_snr / dt (negative: the signal falls as t grows)

    @property
    def alpha_bar(self) -> torch.Tensor:
        return torch.sigmoid(self.log_snr)

    @property
    def snr_derivative(self) -> torch.Tensor:
        """d SNR / dt = SNR(t) * d log_snr / dt."""
        return torch.exp(self.log_snr) * self.slope


class VarianceGradient:
    """The schedule gradient that minimizes the variance of the diffusion term (Kingma et al. 2021, appendix I.2;
    Plaid trains its schedule this way). In continuous time the ELBO depends on the schedule only through its
    endpoints, so the gradient of the loss with respect to the shape u(t) of the schedule between them is pure
    noise in expectation; the shape is better spent minimizing E[L^2], the estimator's second moment, whose
    gradient is E[2 L dL/du]. `wrap(u)` is the identity in the forward pass and, in the backward pass, scales
    each example's gradient by L_i / mean(L), where L_i (B,) is that example's diffusion term, handed over by
    `set_loss` once the loss is known (before backward): the gradient of E[L^2] divided by the positive constant
    2 mean(L), which keeps its direction and gives it the scale of the loss's own (unscaled, the squared loss's
    gradient would dwarf the network's under a global gradient-norm clip). The endpoints keep the loss's own
    gradient."""

    def __init__(self):
        self.scale: Optional[torch.Tensor] = None

    def set_loss(self, diffusion: torch.Tensor) -> None:
        d = diffusion.detach()
        self.scale = d / d.mean().clamp(min=1e-30)

    def wrap(self, u: torch.Tensor) -> torch.Tensor:
        return _ScaledGradient.apply(u, self) if u.requires_grad else u


class _ScaledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, holder):
        ctx.holder = holder
        return u.view_as(u)

    @staticmethod
    def backward(ctx, grad):
        if ctx.holder.scale is None:
            raise RuntimeError("VarianceGradient: backward before set_loss")
        return grad * ctx.holder.scale.to(grad.dtype), None


class GaussianDiffusion(nn.Module):
    """q(x_t | x0), its posterior, the three parameterizations, the ELBO and the training loss.

    `prediction` says what the network outputs: x0, eps (the noise), score (grad log q(x_t)), or
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0. `predict_x0` is the only place they are told apart.
    `t_min` is where the continuous-time process starts (its reconstruction latent); discrete processes
    start at t = 1/T.
    """

    def __init__(self, schedule: Schedule, num_steps: Optional[int] = 2000, prediction: str = "x0",
                 t_min: float = 0.0):
        super().__init__()
        check_choice("prediction", prediction, PREDICTIONS)
        if num_steps is not None and num_steps < 1:
            raise DifflmError(f"num_steps must be a positive integer or null for continuous time, got {num_steps}")
        self.schedule, self.num_steps, self.prediction, self.t_min = schedule, num_steps, prediction, t_min
        self._tables: dict = {}

    @property
    def discrete(self) -> bool:
        return self.num_steps is not None

    # ---- the forward process --------------------------------------------------------------------------------
    def _table(self, device) -> torch.Tensor:
        """[1, alpha_bar_1, .., alpha_bar_T] on `device` (index = step; x_0 is the data itself)."""
        if self.schedule.learnable:
            grid = self.schedule.discretize(self.num_steps)
            return torch.cat([torch.ones_like(grid[:1]), grid]).to(device)
        key = str(device)
        if key not in self._tables:
            grid = self.schedule.discretize(self.num_steps)
            self._tables[key] = torch.cat([torch.ones_like(grid[:1]), grid]).to(device)
        return self._tables[key]

    def step_index(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round(t * self.num_steps).long()

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return self._table(t.device)[self.step_index(t)].to(t.dtype)
        return self.schedule.alpha_bar(t).to(t.dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t)
        return a / (1 - a)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha_bar / (1 - alpha_bar)) at t (on the discrete grid for a discrete process)."""
        a = self.alpha_bar(t)
        return torch.log(a) - torch.log1p(-a)

    def time_of_log_snr(self, log_snr: torch.Tensor, low: float = 0.0, iterations: int = 60) -> torch.Tensor:
        """The continuous time t in [low, 1] at which the (decreasing) log-SNR equals `log_snr`, by bisection."""
        lo = torch.full_like(log_snr, low)
        hi = torch.ones_like(log_snr)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            above = self.schedule.log_snr(mid).to(log_snr.dtype) > log_snr  # still too little noise at mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 alpha_bar: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Luo 2022, eq. 69); `alpha_bar` (B,) if given
        (a NoiseLevel's), else the schedule's at t."""
        a = _bcast(self.alpha_bar(t) if alpha_bar is None else alpha_bar, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def q_posterior(self, x0, x_t, s, t):
        """Mean and variance of q(x_s | x_t, x0) for s < t (Luo 2022, eqs. 84-85 with alpha_{t|s} = abar_t/abar_s)."""
        a_s, a_t = _bcast(self.alpha_bar(s), x0), _bcast(self.alpha_bar(t), x0)
        a_ts = a_t / a_s
        mean = (a_ts.sqrt() * (1 - a_s) * x_t + a_s.sqrt() * (1 - a_ts) * x0) / (1 - a_t)
        var = (1 - a_ts) * (1 - a_s) / (1 - a_t)
        return mean, var.expand_as(x0)

    # ---- parameterizations: exact changes of variables -------------------------------------------------------
    def predict_x0(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 implied by the network's output (Luo 2022 eqs. 115, 133 (Tweedie); Salimans & Ho 2022 for v)."""
        a = _bcast(self.alpha_bar(t), x_t)
        if self.prediction == "x0":
            return model_out
        if self.prediction == "eps":
            return (x_t - (1 - a).sqrt() * model_out) / a.sqrt()
        if self.prediction == "score":
            return (x_t + (1 - a) * model_out) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * model_out  # v

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a perfect network outputs for x_t = q_sample(x0, t, noise) under this parameterization."""
        a = _bcast(self.alpha_bar(t), x0)
        if self.prediction == "x0":
            return x0
        if self.prediction == "eps":
            return noise
        if self.prediction == "score":
            return -noise / (1 - a).sqrt()
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    # ---- time sampling ---------------------------------------------------------------------------------------
    def first_t(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        """The time of the reconstruction latent x_1: 1/T (discrete) or t_min (continuous)."""
        t0 = 1.0 / self.num_steps if self.discrete else self.t_min
        return torch.full((batch,), t0, device=device, dtype=dtype)

    def sample_t(self, batch: int, device, generator=None, low_step: int = 1, dtype=torch.float32,
                 stratum: Optional[tuple] = None, low_discrepancy: bool = False) -> torch.Tensor:
        """Uniform training times: steps low_step..T (discrete) or U(t_min, 1) (continuous).

        `stratum=(a, b)` restricts the draw to that slice of the range (fractions, 0 <= a < b <= 1); estimates from
        `diffusion_term` at such times, weighted by (b - a) and summed over a partition, are unbiased (stratified
        sampling, see `time_strata`). `low_discrepancy` (continuous time): u_i = (u + i / B) mod 1 with one
        u ~ U(0, 1) for the batch (Kingma et al. 2021, appendix I.1): each t_i is still uniform, so every
        per-example estimate stays unbiased, while the batch covers the range evenly (a lower-variance mean)."""
        a, b = stratum or (0.0, 1.0)
        if self.discrete:
            span = self.num_steps + 1 - low_step
            lo, hi = low_step + round(a * span), low_step + round(b * span)
            i = torch.randint(lo, hi, (batch,), device=device, generator=generator)
            return i.to(dtype) / self.num_steps
        if low_discrepancy:
            u0 = torch.rand((), device=device, generator=generator, dtype=torch.float64)
            u = ((u0 + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0).to(dtype)
        else:
            u = torch.rand(batch, device=device, generator=generator, dtype=dtype)
        return self.t_min + (1 - self.t_min) * (a + (b - a) * u)

    def time_strata(self, count: int, low_step: int = 1, smallest: float = 1e-4) -> list:
        """A partition of the time range into at most `count` slices (a, b), geometrically finer towards t_min,
        where weights such as Diffusion-LM's SNR ~ 1/t concentrate, or equal in continuous time for a schedule
        with `uniform_strata` (finite log-SNR endpoints: EndpointSchedule). Discrete slices hold whole steps (the
        first is the single step low_step); continuous geometric slices start at `smallest`."""
        if count <= 1:
            return [(0.0, 1.0)]
        if self.discrete:
            span = self.num_steps + 1 - low_step
            cuts = torch.logspace(0, math.log10(span), count, dtype=torch.float64).round().long().unique()
            edges = [0.0] + [c.item() / span for c in cuts]
        elif self.schedule.uniform_strata:
            edges = [k / count for k in range(count + 1)]
        else:
            edges = [0.0] + torch.logspace(math.log10(smallest), 0, count, dtype=torch.float64).tolist()
        return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    # ---- objectives ------------------------------------------------------------------------------------------
    def denoise(self, model_fn: ModelFn, x0, t, noise) -> DenoiseOutput:
        """The simple loss ||target - output||^2 (mean over data dims) in the native parameterization."""
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)
        loss = ((out - self.target(x0, noise, t)) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
        return DenoiseOutput(loss=loss, x0_hat=self.predict_x0(out, x_t, t), x_t=x_t, t=t)

    def prior_kl(self, x0: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """KL(q(x_T | x0) || N(0, I)) summed over data dims (Luo 2022, eq. 58, prior matching); over the dims
        where `keep` (broadcast to x0) is true, if given (the others are not latents of the model)."""
        t = torch.ones(x0.shape[0], device=x0.device, dtype=x0.dtype)
        a = _bcast(self.alpha_bar(t), x0)
        kl = gaussian_kl(a.sqrt() * x0, (1 - a).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))
        return _sum_except_batch(kl if keep is None else kl * keep)

    def diffusion_term(self, x0: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor,
                       level: Optional[NoiseLevel] = None) -> torch.Tensor:
        """Unbiased one-sample estimate of the summed denoising-matching KLs from the x0 error at time t.

        Discrete (t = i/T, i >= 2, drawn uniformly): (T - 1) * 1/2 (SNR(t_{i-1}) - SNR(t_i)) ||x0 - x0_hat||^2
        (Luo 2022 eq. 108 in SNR form, Kingma et al. 2021 eq. 13). Continuous (t ~ U(t_min, 1)):
        (1 - t_min) * -1/2 SNR'(t) ||x0 - x0_hat||^2 (Kingma et al. 2021 eq. 17).
        """
        return self.diffusion_weight(t, level) * _sum_except_batch((x0 - x0_hat) ** 2)

    def diffusion_weight(self, t: torch.Tensor, level: Optional[NoiseLevel] = None) -> torch.Tensor:
        """The weight w(t) (B,) of ||x0 - x0_hat||^2 in `diffusion_term`; continuous time from `level` if given."""
        if self.discrete:
            s = t - 1.0 / self.num_steps
            return (self.num_steps - 1) * 0.5 * (self.snr(s) - self.snr(t))
        level = level or self.noise_level(t)
        return ((1 - self.t_min) * 0.5 * -level.snr_derivative).to(t.dtype)

    def noise_level(self, t: torch.Tensor, variance: Optional[VarianceGradient] = None) -> NoiseLevel:
        """log-SNR and its slope at continuous times t (B,), the slope by autograd through the schedule (kept
        differentiable where the schedule is learned and gradients are on). `variance`: the schedule's shape u(t)
        between its endpoints (an EndpointSchedule) gets the variance-minimizing gradient (VarianceGradient)."""
        differentiable = self.schedule.learnable and torch.is_grad_enabled()
        with torch.enable_grad():
            tt = t.detach().requires_grad_(True)
            if variance is not None and isinstance(self.schedule, EndpointSchedule):
                u = self.schedule.unit(tt)
                (du,) = torch.autograd.grad(u.sum(), tt, create_graph=differentiable)
                log_snr, slope = self.schedule.from_unit(variance.wrap(u), variance.wrap(du))
            else:
                log_snr = self.schedule.log_snr(tt)
                (slope,) = torch.autograd.grad(log_snr.sum(), tt, create_graph=differentiable)
        if not differentiable:
            log_snr, slope = log_snr.detach(), slope.detach()
        return NoiseLevel(log_snr=log_snr.to(t.dtype), slope=slope.to(t.dtype))

    def gaussian_reconstruction(self, model_fn: ModelFn, x0, noise) -> torch.Tensor:
        """-log p(x0 | x_1) with p(x0 | x_1) = N(x0_hat(x_1), 1/SNR(t_1) I): the decoder whose variance is that
        of x0 given x_1 when x0 is known only through x_1 (the limit of the true posterior at high SNR)."""
        t = self.first_t(x0.shape[0], x0.device, x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        x0_hat = self.predict_x0(model_fn(x_t, t), x_t, t)
        var = _bcast(1.0 / self.snr(t), x0).expand_as(x0)
        return -_sum_except_batch(gaussian_log_prob(x0, x0_hat, var))

    def elbo(self, model_fn: ModelFn, x0: torch.Tensor, reconstruction=None, t=None, generator=None,
             variance: Optional[VarianceGradient] = None, keep: Optional[torch.Tensor] = None) -> ELBOTerms:
        """The three terms of -ELBO per example (Luo 2022, eq. 45), the diffusion term by one sample of t.

        `reconstruction(model_fn, x0, noise) -> (B,)` is the modality's -log p(x0 | x_1); by default the
        Gaussian decoder `gaussian_reconstruction`. `t` fixes the diffusion term's time (discrete: i >= 2).
        `variance` (continuous time): the schedule's shape gets the variance-minimizing gradient; call its
        `set_loss` with the returned diffusion term before backward. `keep` (broadcast to x0): the prior over
        those dims only (`prior_kl`); the caller's reconstruction and model already treat the others as given.
        """
        reconstruction = reconstruction or self.gaussian_reconstruction
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        recon = reconstruction(model_fn, x0, noise)
        if t is None:
            t = self.sample_t(b, x0.device, generator=generator, low_step=2, dtype=x0.dtype)
        if self.discrete and self.num_steps == 1:
            diff = torch.zeros(b, device=x0.device, dtype=x0.dtype)
        else:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            level = None if self.discrete else self.noise_level(t, variance)
            x_t = self.q_sample(x0, t, noise, None if level is None else level.alpha_bar)
            diff = self.diffusion_term(x0, self.predict_x0(model_fn(x_t, t), x_t, t), t, level)
        return ELBOTerms(reconstruction=recon, prior=self.prior_kl(x0, keep), diffusion=diff)


class TimeWarp(nn.Module):
    """CDCD's time warping (Dieleman et al. 2022, sec. 3.3): training times drawn where the loss changes.

    The loss of the x0 estimate, L(t), rises from about 0 (no noise) to its maximum (all noise). Its normalised
    form F(t) = L(t) / L(1) is a CDF over t; drawing u ~ U(0, 1) and t = F^-1(u) puts training where the
    denoiser's task changes fastest (density F'(t)), which uniform t spends mostly on near-trivial and
    hopeless noise levels. F is piecewise linear on `bins` equal bins of t: `level[b]` is a running mean of the
    loss at times in bin b, taken as L at the bin's right edge (L(0) = 0), made monotone by a running maximum;
    each bin keeps at least `floor` / bins of the mass, so that no noise level goes untrained. The buffers are
    saved with the model (and its checkpoint), so a resumed run draws the same times and a sampler can put its
    grid through the same F (t_k = F^-1(k / K)).
    """

    def __init__(self, bins: int, rate: float = 0.01, floor: float = 0.05):
        super().__init__()
        self.bins, self.rate, self.floor = bins, rate, floor
        self.register_buffer("level", torch.zeros(bins))  # running mean of the loss in each bin
        self.register_buffer("seen", torch.zeros(bins))  # 1 once a bin has had a sample

    def masses(self) -> torch.Tensor:
        """Probability of each bin (bins,): F's increase across it, mixed with `floor` of the uniform."""
        level = self.level.float()
        uniform = torch.full_like(level, 1.0 / self.bins)
        rising = torch.cummax(level, 0).values
        steps = torch.diff(rising, prepend=torch.zeros_like(rising[:1])).clamp(min=0)
        total = steps.sum()
        # uniform until every bin has been seen (tensor selects: no value is read back to the host)
        shape = torch.where((total > 0) & self.seen.bool().all(), steps / total.clamp(min=1e-30), uniform)
        return (1 - self.floor) * shape + self.floor / self.bins

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """F(t) for t in [0, 1], piecewise linear."""
        m = self.masses().to(t.device, torch.float64)
        knots = torch.cat([torch.zeros(1, dtype=m.dtype, device=m.device), torch.cumsum(m, 0)])
        pos = t.double().clamp(0, 1) * self.bins
        b = pos.floor().long().clamp(max=self.bins - 1)
        return (knots[b] + (pos - b) * m[b]).to(t.dtype)

    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """F^-1(u) for u in [0, 1]: the time whose CDF value is u."""
        m = self.masses().to(u.device, torch.float64)
        knots = torch.cumsum(m, 0)
        uu = u.double().clamp(0, 1)
        b = torch.searchsorted(knots, uu, right=True).clamp(max=self.bins - 1)
        below = torch.where(b > 0, knots[(b - 1).clamp(min=0)], torch.zeros_like(uu))
        return ((b + (uu - below) / m[b]) / self.bins).clamp(0, 1).to(u.dtype)

    @torch.no_grad()
    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold a batch's per-example losses (B,) at times t (B,) into the bins' running means."""
        b = (t.detach().float() * self.bins).long().clamp(0, self.bins - 1)
        total = torch.zeros(self.bins, device=t.device).index_add_(0, b, loss.detach().float())
        count = torch.zeros(self.bins, device=t.device).index_add_(0, b, torch.ones_like(total[b]))
        mean = total / count.clamp(min=1)
        hit = count > 0
        first = hit & ~self.seen.bool()
        new = torch.where(first, mean, self.level + self.rate * (mean - self.level))
        self.level.copy_(torch.where(hit, new, self.level))
        self.seen.copy_(torch.maximum(self.seen, hit.to(self.seen.dtype)))

    def sample(self, batch: int, device, generator=None, dtype=torch.float32) -> torch.Tensor:
        """t = F^-1(u), u ~ U(0, 1): (batch,)."""
        return self.inverse_cdf(torch.rand(batch, device=device, generator=generator, dtype=dtype))
