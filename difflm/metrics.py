"""Evaluation: the text model's likelihood bound, sample diversity, and the embedded grammar's exact figures.

Every number here is per example first and averaged last, so that each mean comes with its standard error.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .diffusion import GaussianDiffusion
from .rounding import rounding_nll
from .text import bound_model_fn, embed_with_noise, is_elbo_model, text_elbo

LN2 = math.log(2.0)


# ---- the text ELBO ---------------------------------------------------------------------------------------------
@dataclass
class TextBound:
    """Per-sequence terms of the bound -log p(w) <= rounding + reconstruction + diffusion + prior - entropy (nats).

    rounding: -log p(w | x0); reconstruction: -log p(x0 | x_1); diffusion: the denoising-matching KLs with their
    true weights; prior: KL(q(x_T | x0) || N(0, I)); entropy: H(q(x0 | w)) of the embedding noise.
    """

    rounding: torch.Tensor
    reconstruction: torch.Tensor
    diffusion: torch.Tensor
    prior: torch.Tensor
    entropy: torch.Tensor
    length: torch.Tensor  # -log p(n) of a config.explicit_length model (0 where the length is diffused)

    @property
    def nll(self) -> torch.Tensor:
        return self.rounding + self.reconstruction + self.diffusion + self.prior - self.entropy + self.length


TERMS = ("rounding", "reconstruction", "diffusion", "prior", "entropy", "length")


def continuous_twin(diffusion: GaussianDiffusion) -> GaussianDiffusion:
    """The continuous-time process of a discrete one: same schedule and prediction, starting at t_min = 1/T (a
    continuous process is its own twin)."""
    if not diffusion.discrete:
        return diffusion
    return GaussianDiffusion(diffusion.schedule, num_steps=None, prediction=diffusion.prediction,
                             t_min=1.0 / diffusion.num_steps)


@torch.no_grad()
def text_bound(model, ids: torch.Tensor, continuous: bool = False, generator: Optional[torch.Generator] = None,
               stratum: Optional[tuple] = None) -> TextBound:
    """One Monte Carlo draw of the text ELBO for token ids (B, L), over every position of the padded sequence.

    Latents w -> x0 -> x_1..x_T with q(x0 | w) = N(Emb(w), sigma0^2 I), sigma0^2 = 1 - abar_1 (text.text_loss):

        log p(w) >= E_q[log p(w | x0)] + E_q(x0|w)[ELBO of the core on x0] + H(q(x0 | w)),

    the core's ELBO (`GaussianDiffusion.elbo`, Gaussian decoder at x_1) in discrete time or, with `continuous`,
    in continuous time from t = 1/T. A self-conditioned network is scored without its previous estimate.
    A model trained on the ELBO (config.objective=elbo, continuous time) has its own chain w -> z_0 .. z_1
    (`text.text_elbo`, self-conditioned as it samples): there the rounding and entropy terms are 0 and the
    reconstruction is -log p(w | z_0) of the network's logits.
    `stratum=(a, b)` draws the diffusion term's time from that slice of the range (see `sample_t`); the
    diffusion term then estimates the whole sum and must be weighted by (b - a) over a partition.
    """
    diffusion = model.diffusion
    if is_elbo_model(model):
        t = diffusion.sample_t(ids.shape[0], ids.device, generator=generator, stratum=stratum)
        terms = text_elbo(model, ids, generator, t=t)
        zero = torch.zeros_like(terms.prior)
        return TextBound(rounding=zero, reconstruction=terms.reconstruction, diffusion=terms.diffusion,
                         prior=terms.prior, entropy=zero, length=model.length_nll(ids).to(zero.dtype))
    if continuous:
        diffusion = continuous_twin(diffusion)
    latent = embed_with_noise(model, ids, generator)
    x0 = latent.x0
    t = diffusion.sample_t(ids.shape[0], ids.device, generator=generator, low_step=2, dtype=x0.dtype, stratum=stratum)
    terms = diffusion.elbo(bound_model_fn(model, ids), x0, t=t, generator=generator)
    entropy = 0.5 * x0[0].numel() * (1 + torch.log(2 * math.pi * latent.var0))
    return TextBound(rounding=rounding_nll(x0, model.rounding_weight(x0.dtype), ids),
                     reconstruction=terms.reconstruction, diffusion=terms.diffusion, prior=terms.prior, entropy=entropy,
                     length=torch.zeros_like(entropy))


@dataclass
class Estimate:
    mean: float
    se: float


@dataclass
class BoundReport:
    """The ELBO bound on held-out text: -log p per sequence and normalized by two token counts.

    per_token divides the total by the count of real tokens and END (START and PAD excluded); per_position by all
    L positions. The perplexity bound is exp(nats per token). The bound covers the whole padded sequence, PAD
    included, since the model generates every position.
    """

    time: str  # "discrete" or "continuous"
    sequences: int
    draws_per_sequence: int
    nats_per_sequence: Estimate
    nats_per_token: Estimate
    bits_per_token: Estimate
    perplexity_bound: float
    nats_per_position: Estimate
    terms_per_sequence: Dict[str, float]
    # with the exact -log p(w) of each sequence (the embedded grammar): bound minus it, paired per sequence
    gap_to_exact: Optional[Estimate] = None
    exact_nats_per_sequence: Optional[float] = None
    # with another model's bound on the same sequences and draws (`difflm eval --baseline`): this one's minus it
    baseline: Optional[str] = None
    minus_baseline_per_sequence: Optional[Estimate] = None
    minus_baseline_per_token: Optional[Estimate] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _estimate(values: torch.Tensor) -> Estimate:
    v = values.double()
    se = v.std(unbiased=True).item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return Estimate(mean=v.mean().item(), se=se)


def _ratio_estimate(num: torch.Tensor, den: torch.Tensor) -> Estimate:
    """sum(num) / sum(den) with its delta-method standard error (as corpus-level per-token figures are defined)."""
    num, den = num.double(), den.double()
    ratio = (num.sum() / den.sum()).item()
    if len(num) < 2:
        return Estimate(ratio, float("nan"))
    return Estimate(ratio, (num - ratio * den).std(unbiased=True).item() / (den.mean().item() * math.sqrt(len(num))))


def stratified(draw: Callable[[tuple], Dict[str, torch.Tensor]], strata: List[tuple]) -> Dict[str, torch.Tensor]:
    """Per-example ELBO terms from one `draw(stratum)` in each slice of a partition of t (`time_strata`): the
    diffusion term (an estimate of the whole sum from a time in the slice) weighted by the slice's width and
    summed, which is unbiased; the other terms averaged over the draws."""
    draws = [draw(s) for s in strata]
    out = {k: torch.stack([d[k] for d in draws]).mean(0) for k in draws[0]}
    out["diffusion"] = sum((b - a) * d["diffusion"] for (a, b), d in zip(strata, draws))
    return out


def _bound_strata(model, continuous: bool, draws: int) -> list:
    process = continuous_twin(model.diffusion) if continuous else model.diffusion
    return process.time_strata(draws, low_step=2)


def sequence_bounds(model, ids: torch.Tensor, continuous: bool = False, draws: int = 1, batch_size: int = 64,
                    seed: int = 0, progress: Optional[Callable[[int], None]] = None) -> TextBound:
    """The bound's terms for each sequence of `ids` from stratified draws: one draw of `text_bound` in each slice
    of `time_strata(draws)` (geometric, finer near t = 0, where the sqrt schedule's weights are heavy; uniform for
    a schedule with log-SNR endpoints, whose learned shape spreads the term evenly over t), the
    diffusion term weighted by the slice's width, the other terms averaged. The noise comes from one generator
    seeded with `seed`, so two models of the same shapes scored with one seed share their draws (common random
    numbers), which makes their per-sequence difference far less noisy than either bound."""
    model.eval()
    continuous = continuous or not model.diffusion.discrete
    g = torch.Generator(device=ids.device).manual_seed(seed)
    strata = _bound_strata(model, continuous, draws)
    rows: List[TextBound] = []
    for i in range(0, len(ids), batch_size):
        batch = ids[i: i + batch_size]
        rows.append(TextBound(**stratified(lambda s: vars(text_bound(model, batch, continuous, g, stratum=s)),
                                           strata)))
        if progress:
            progress(len(batch))
    return TextBound(**{k: torch.cat([getattr(r, k) for r in rows]) for k in TERMS})


def bound_report(model, ids: torch.Tensor, continuous: bool = False, draws: int = 1, batch_size: int = 64,
                 seed: int = 0, progress: Optional[Callable[[int], None]] = None,
                 exact: Optional[torch.Tensor] = None, baseline: Optional[torch.Tensor] = None,
                 baseline_name: Optional[str] = None) -> BoundReport:
    """The bound per sequence (`sequence_bounds`) with standard errors across sequences.
    `exact` (N,): the true -log p(w) of each sequence where known (the embedded grammar); the report then has
    the gap bound - exact, paired per sequence (its mean estimates E_w[bound] - H; never below 0 in truth).
    `baseline` (N,): another model's bound on the same sequences (`sequence_bounds` with the same seed); the report
    then has this model's bound minus it, paired per sequence and per token."""
    continuous = continuous or not model.diffusion.discrete
    bound = sequence_bounds(model, ids, continuous, draws, batch_size, seed, progress)
    cfg = model.config
    nats_seq = _estimate(bound.nll)
    tokens = ((ids != cfg.pad_id) & (ids != cfg.start_id)).sum(dim=1).clamp(min=1).to(bound.nll.dtype)  # words + END
    nats_tok = _ratio_estimate(bound.nll, tokens)
    diff = None if baseline is None else bound.nll.double() - baseline.double().to(bound.nll.device)
    return BoundReport(
        time="continuous" if continuous else "discrete", sequences=len(ids),
        draws_per_sequence=len(_bound_strata(model, continuous, draws)),
        nats_per_sequence=nats_seq, nats_per_token=nats_tok,
        bits_per_token=Estimate(nats_tok.mean / LN2, nats_tok.se / LN2), perplexity_bound=math.exp(nats_tok.mean),
        nats_per_position=Estimate(nats_seq.mean / ids.shape[1], nats_seq.se / ids.shape[1]),
        terms_per_sequence={k: getattr(bound, k).double().mean().item() for k in TERMS},
        gap_to_exact=None if exact is None else _estimate(bound.nll.double() - exact.double().to(bound.nll.device)),
        exact_nats_per_sequence=None if exact is None else exact.double().mean().item(),
        baseline=baseline_name if diff is not None else None,
        minus_baseline_per_sequence=None if diff is None else _estimate(diff),
        minus_baseline_per_token=None if diff is None else _ratio_estimate(diff, tokens))


# ---- diversity -------------------------------------------------------------------------------------------------
def ngrams(tokens: Sequence[str], n: int) -> List[tuple]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams in the samples (Li et al. 2016)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002) with clipped counts against all references, the closest reference
    length for the brevity penalty, and add-one smoothing of the n-gram precisions for n > 1 (Lin & Och 2004)."""
    if not hypothesis:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter = Counter()
        for ref in references:
            best |= Counter(ngrams(ref, n))
        matched = sum(min(c, best[g]) for g, c in hyp.items())
        total = max(sum(hyp.values()), 0)
        smooth = 1 if n > 1 else 0
        if matched + smooth == 0 or total + smooth == 0:
            return 0.0
        log_p += math.log((matched + smooth) / (total + smooth)) / max_n
    ref_len = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    bp = 1.0 if len(hypothesis) > ref_len else math.exp(1 - ref_len / len(hypothesis))
    return bp * math.exp(log_p)


def self_bleu(texts: Sequence[str], max_n: int = 4, limit: int = 500) -> float:
    """Mean BLEU of each sample against all the others (Zhu et al. 2018); higher means less diverse.
    At most `limit` samples are used as hypotheses (every sample still serves as a reference)."""
    toks = [t.split() for t in texts]
    if len(toks) < 2:
        return float("nan")
    scores = [bleu(h, toks[:i] + toks[i + 1:], max_n) for i, h in enumerate(toks[:limit])]
    return sum(scores) / len(scores)


def unigram_entropy(texts: Sequence[str]) -> float:
    """Entropy (nats) of the unigram distribution of the words in `texts`."""
    counts = Counter(w for t in texts for w in t.split())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


@dataclass
class Diversity:
    distinct_1: float
    distinct_2: float
    distinct_3: float
    self_bleu: float
    unigram_entropy: float
    reference_unigram_entropy: Optional[float] = None


def diversity(texts: Sequence[str], reference: Optional[Sequence[str]] = None) -> Diversity:
    return Diversity(distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2), distinct_3=distinct_n(texts, 3),
                     self_bleu=self_bleu(texts), unigram_entropy=unigram_entropy(texts),
                     reference_unigram_entropy=unigram_entropy(reference) if reference else None)


# ---- the embedded grammar --------------------------------------------------------------------------------------
@dataclass
class GrammarReport:
    """Exact figures of the embedded grammar and of samples under it."""

    entropy_per_sentence: float  # nats
    entropy_per_token: float  # nats per word + END: H / (E[words] + 1), as the bound's per_token
    grammatical_share: float
    samples: int
    mean_log_prob_of_grammatical: Optional[float]  # nats per sentence, over the grammatical samples
    # exp(-sum log p / sum (words + 1)) over the grammatical samples: the true distribution's perplexity of them,
    # counted like lm-score (words and END), so the teacher's lm-score of the same samples can be set beside it
    exact_perplexity_of_grammatical: Optional[float]
    true_perplexity: float  # exp(entropy per token): what a perfect generator's samples score on average


def grammar_report(grammar, texts: Sequence[str]) -> GrammarReport:
    scored = [(grammar.log_prob(t), len(t.split()) + 1) for t in texts]
    ok = [(lp, n) for lp, n in scored if lp > -math.inf]
    per_token = grammar.entropy() / (grammar.expected_length() + 1)
    return GrammarReport(
        entropy_per_sentence=grammar.entropy(), entropy_per_token=per_token,
        grammatical_share=len(ok) / len(texts) if texts else float("nan"), samples=len(texts),
        mean_log_prob_of_grammatical=sum(lp for lp, _ in ok) / len(ok) if ok else None,
        exact_perplexity_of_grammatical=math.exp(-sum(lp for lp, _ in ok) / sum(n for _, n in ok)) if ok else None,
        true_perplexity=math.exp(per_token))
