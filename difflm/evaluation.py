"""`difflm eval`: every metric of a model in one pass, as a JSON-ready dataclass.

The field reports two incompatible perplexities and each is gamed alone: the teacher's lm-score rewards dull
samples, the likelihood bound says nothing of sample quality. So both are reported, with diversity beside them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .config import Config
from .data import decode, encode, load_texts
from .errors import DifflmError, check_choice
from .grammar import source_grammar
from .metrics import bound_report, diversity, grammar_report, sequence_bounds
from .sampling import check_request
from .text import (SamplingModelFn, bound_model_fn, embed_with_noise, estimate_ids, generate, is_elbo_model,
                   sample_ids, sampling_temperature)

log = logging.getLogger("difflm")
METRICS = ("bound", "lm_score", "diversity", "grammar")
SAMPLE_METRICS = frozenset({"lm_score", "diversity", "grammar"})  # those that score generated samples


@dataclass
class DenoisingCurve:
    """Per-element x0 error along t on held-out text, and where the bound's diffusion nats are spent."""

    t: List[float]
    mse: List[float]  # E ||x0 - x0_hat||^2 / (L d)
    nats_per_decade: List[float]  # the diffusion term's density over log10 t (nats per sequence): its area is the term
    share_by_decade: Dict[str, float]  # the diffusion term's share in each decade of t (from the points, trapezoids)
    kl_per_step: List[float] = field(default_factory=list)  # discrete: 1/2 (SNR_{t-1} - SNR_t) E||x0 - x0_hat||^2


@dataclass
class Trajectory:
    """One sample's x0 estimate, rounded to text, at chosen times of the sampler."""

    t: List[float]
    text: List[str]


@dataclass
class Evaluation:
    model: str
    samples: int
    held_out: int
    metrics: Dict[str, dict] = field(default_factory=dict)
    curve: Optional[DenoisingCurve] = None
    trajectories: List[Trajectory] = field(default_factory=list)
    examples: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_metrics(names: Sequence[str]) -> List[str]:
    for n in names:
        check_choice("metric", n, METRICS)
    return list(names)


@torch.no_grad()
def denoising_curve(model, ids: torch.Tensor, points: int = 40, seed: int = 0) -> DenoisingCurve:
    """x0 error and the diffusion term's density at `points` times spaced geometrically: steps 2..T (discrete)
    or t in [max(t_min, 1e-4), 1] (continuous), on the latents and network the bound scores (metrics.text_bound)."""
    d = model.diffusion
    g = torch.Generator(device=ids.device).manual_seed(seed)
    if d.discrete:
        steps = torch.logspace(math.log10(2), math.log10(d.num_steps), points).round().long().unique()
        times, span = (steps.double() / d.num_steps).tolist(), (d.num_steps - 1) / d.num_steps
    else:
        low = max(d.t_min, 1e-4)
        times, span = torch.logspace(math.log10(low), 0, points, dtype=torch.float64).tolist(), 1 - d.t_min
    elbo = is_elbo_model(model)
    x0 = model.embed(ids) if elbo else embed_with_noise(model, ids, g).x0
    net = bound_model_fn(model, ids)
    b = ids.shape[0]
    mse, density, kl = [], [], []
    for time in times:
        t = torch.full((b,), time, device=ids.device)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, device=x0.device))
        err = ((x0 - d.predict_x0(net(x_t, t), x_t, t)) ** 2).sum(dim=(1, 2))  # (B,)
        mse.append(err.mean().item() / x0[0].numel())
        whole = (d.diffusion_weight(t) * err).mean().item()  # the whole term if every t were this one
        density.append(whole / span)  # nats per unit t
        if d.discrete:  # one step's KL: the whole term over its T - 1 steps
            kl.append(whole / (d.num_steps - 1))
    per_decade = [f * time * math.log(10) for f, time in zip(density, times)]
    return DenoisingCurve(t=times, mse=mse, nats_per_decade=per_decade,
                          share_by_decade=_decade_shares(times, per_decade), kl_per_step=kl)


def _decade_shares(times: Sequence[float], per_decade: Sequence[float]) -> Dict[str, float]:
    """The share of the area under per_decade (over log10 t, trapezoids) in each decade of t."""
    logs = [math.log10(t) for t in times]
    areas: Dict[str, float] = {}
    for (l0, l1), (f0, f1) in zip(zip(logs, logs[1:]), zip(per_decade, per_decade[1:])):
        top = math.ceil(round(l1, 9))  # the decade (10^(top-1), 10^top] the slice ends in
        key = f"{10.0 ** (top - 1):g}..{10.0 ** top:g}"
        areas[key] = areas.get(key, 0.0) + 0.5 * (f0 + f1) * (l1 - l0)
    total = sum(areas.values()) or 1.0
    return {k: v / total for k, v in areas.items()}


def trajectories(model, tokenizer, count: int = 3, times: Sequence[float] = (1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1,
                 0.05, 0.02, 0.0), steps: int = 200, seed: int = 0,
                 temperature: Optional[float] = None) -> List[Trajectory]:
    """Sample `count` sequences (DDPM, as `generate` with this seed draws its first `count`) and keep the x0
    estimate at the sampler step nearest each time, decoded as the final samples are (text.estimate_ids)."""
    seen: List[tuple] = []
    model_fn = SamplingModelFn(model, temperature=temperature)

    def callback(state):
        seen.append((state.t[0].item(), estimate_ids(model, model_fn, state.x0_hat).tolist()))

    model.eval()
    generator = torch.Generator(device=model.embedding.weight.device).manual_seed(seed)
    sample_ids(model, model_fn, count, steps=steps, generator=generator, callback=callback)
    out = [Trajectory(t=[], text=[]) for _ in range(count)]
    for target in times:
        t, rows = min(seen, key=lambda item: abs(item[0] - target))
        for k in range(count):
            out[k].t.append(round(t, 4))
            out[k].text.append(decode(rows[k], tokenizer))
    return out


def evaluate_model(model, tokenizer, cfg: Config, samples: Optional[List[str]], metrics: Sequence[str],
                   teacher=None, num_samples: int = 256, steps: int = 200, held_out: int = 512,
                   bound_draws: int = 16, seed: int = 0, model_name: str = "", show_progress: bool = True,
                   temperature: Optional[float] = None, sampler="ddpm", baseline=None, baseline_name: str = ""):
    """Run the chosen metrics; generate `num_samples` samples (by `sampler` in `steps` steps, at `temperature`,
    None: the model's default) when none are given. `baseline`: another model of the same tokenizer and length,
    whose continuous-time bound on the same held-out texts and draws is subtracted per sequence (the paired
    comparison of two recipes, far tighter than comparing their bounds' standard errors)."""
    metrics = check_metrics(metrics)
    if baseline is not None and "bound" not in metrics:
        raise DifflmError("--baseline compares likelihood bounds; add bound to --metrics")
    if "lm_score" in metrics and teacher is None:
        raise DifflmError("lm_score needs --teacher DIR (train one with `difflm train-teacher --model MODEL`)")
    if "bound" in metrics and getattr(model.config, "explicit_length", False) and not is_elbo_model(model):
        raise DifflmError("--metrics bound: this model has model.explicit_length with the weighted objective, whose "
                          "embedding noise at the given PAD positions has no bound; drop bound from --metrics, or "
                          "train with model.objective=elbo")
    device = model.embedding.weight.device
    if samples is None and not SAMPLE_METRICS.intersection(metrics):
        samples = []  # the bound needs none: no generation
    if samples is None:
        check_request(model.diffusion, num_samples, steps, 64, sampler=sampler, warp=model.time_warp)
        temperature = sampling_temperature(model, temperature)
        with tqdm(total=num_samples, desc="generate", disable=not show_progress, dynamic_ncols=True) as bar:
            samples = [s.text for s in generate(model, tokenizer, num_samples, steps=steps, seed=seed, sampler=sampler,
                                                progress=bar.update, temperature=temperature)]
    dev_texts = load_texts(cfg.data).dev[:held_out]
    dev_ids, truncated = encode(dev_texts, tokenizer, model.config.seq_len)
    dev_ids = dev_ids.to(device)
    result = Evaluation(model=model_name, samples=len(samples), held_out=len(dev_texts), examples=samples[:10])
    grammar = source_grammar(cfg.data.source)
    if "bound" in metrics:
        exact = None
        if grammar is not None and not truncated:  # the true -log p of each held-out sentence
            exact = torch.tensor([-grammar.log_prob(text) for text in dev_texts], dtype=torch.float64)
        reference = None
        if baseline is not None:
            with tqdm(total=len(dev_ids), desc="bound of the baseline (continuous)", disable=not show_progress,
                      dynamic_ncols=True) as bar:
                reference = sequence_bounds(baseline, dev_ids, continuous=True, draws=bound_draws, seed=seed,
                                            progress=bar.update).nll
        for continuous in (False, True) if model.diffusion.discrete else (True,):
            with tqdm(total=len(dev_ids), desc=f"bound ({'continuous' if continuous else 'discrete'})",
                      disable=not show_progress, dynamic_ncols=True) as bar:
                rep = bound_report(model, dev_ids, continuous=continuous, draws=bound_draws, seed=seed,
                                   progress=bar.update, exact=exact, baseline=reference if continuous else None,
                                   baseline_name=baseline_name)
            result.metrics[f"bound_{rep.time}"] = rep.to_dict()
        result.metrics[next(k for k in result.metrics if k.startswith("bound_"))]["truncated_held_out_texts"] = truncated
        result.curve = denoising_curve(model, dev_ids[:128], seed=seed)
        result.trajectories = trajectories(model, tokenizer, steps=min(steps, model.diffusion.num_steps or steps),
                                           seed=seed, temperature=temperature)
    if "lm_score" in metrics:
        from .teacher import lm_score

        teacher_model, teacher_tok = teacher
        result.metrics["lm_score"] = {
            "samples": lm_score(teacher_model, teacher_tok, samples, model.config.seq_len),
            "held_out_text": lm_score(teacher_model, teacher_tok, dev_texts, model.config.seq_len)}
    if "diversity" in metrics:
        result.metrics["diversity"] = asdict(diversity(samples, reference=dev_texts))
        # the same statistics of as many held-out texts: distinct-n and self-BLEU depend on the count
        result.metrics["diversity_held_out"] = asdict(diversity(dev_texts[: len(samples)]))
    if "grammar" in metrics:
        if grammar is None:
            raise DifflmError(f"the grammar metric needs a model trained on the embedded grammar "
                              f"(data.source builtin:...), not {cfg.data.source}")
        result.metrics["grammar"] = asdict(grammar_report(grammar, samples))
    return result
