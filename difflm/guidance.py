"""Gradient guidance on the latents (Diffusion-LM, Li et al. 2022, section 5.2), batched and composable.

A guide is any object with `log_prob(x, t) -> (B,)`, a differentiable log p(c | x_t = x, t) per example: a noisy
classifier, or a constraint scored through the diffusion model's own x0 estimate. After each sampler step the
proposed x_{t-1} is moved by K gradient-ascent steps on

    sum_g w_g log p(c_g | x_{t-1}) - lambda * ||x_{t-1} - mu_theta(x_t, t)||^2 / sigma_t^2,

whose second term (fluency) keeps x_{t-1} near the model's own proposal. K, the step size, lambda, the optimizer
(Adagrad, as in Diffusion-LM, or plain gradient steps) and how many final steps are left unguided come from
`GuidanceConfig`; nothing is a constant here.

Where the step is deterministic (DDIM, and the last step, which returns x0_hat) sigma_t^2 = 0; the fluency term
then uses the first step's variance 1 - abar_1, the smallest noise level the model was trained on.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Tuple

import torch

from .config import GuidanceConfig
from .diffusion import GaussianDiffusion, _bcast
from .errors import check_choice
from .sampling import StepState

OPTIMIZERS = ("adagrad", "sgd")


class Guide(Protocol):
    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(c | x_t = x, t) for each example: (B,)."""


def check_guidance_config(cfg: GuidanceConfig) -> None:
    check_choice("guidance.optimizer", cfg.optimizer, OPTIMIZERS)


class Guidance:
    """The sampler's `guide` hook (sampling.sample): K gradient steps on x_s for a weighted sum of guides."""

    def __init__(self, diffusion: GaussianDiffusion, guides: Sequence[Tuple[Guide, float]], cfg: GuidanceConfig):
        check_guidance_config(cfg)
        self.diffusion, self.guides, self.cfg = diffusion, list(guides), cfg

    def objective(self, x: torch.Tensor, t: torch.Tensor, mean: Optional[torch.Tensor] = None,
                  var: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example guided objective (B,): the guides' weighted log-probabilities minus the fluency term."""
        total = sum(w * g.log_prob(x, t) for g, w in self.guides)
        if mean is not None and self.cfg.fluency > 0:
            total = total - self.cfg.fluency * ((x - mean) ** 2 / var).flatten(1).sum(1)
        return total

    def __call__(self, state: StepState) -> torch.Tensor:
        cfg = self.cfg
        if not self.guides or cfg.steps == 0 or state.index >= state.num_steps - cfg.unguided_last:
            return state.x_s
        d = self.diffusion
        t1 = d.first_t(state.s.shape[0], state.s.device, state.s.dtype)
        t = torch.maximum(state.s, t1)  # the guides score x_s at its own noise level (at least the first step's)
        var = state.var
        if not bool((var > 0).all()):
            var = torch.where(var > 0, var, _bcast(1 - d.alpha_bar(t1), state.x_s))
        x = state.x_s.detach().clone()
        mean = state.mean.detach()
        squares = torch.zeros_like(x)
        for _ in range(cfg.steps):
            with torch.enable_grad():
                x.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.objective(x, t, mean, var).sum(), x)
            x = x.detach()
            if cfg.optimizer == "adagrad":  # torch.optim.Adagrad's update, with its state fresh at every step
                squares += grad ** 2
                grad = grad / (squares.sqrt() + 1e-10)
            x = x + cfg.step_size * grad
        return x
