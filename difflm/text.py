"""The text objective of Diffusion-LM on the generic core, text generation, and model directories."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .card import warn_if_unfinished
from .data import attribute_vectors, decode
from .diffusion import ELBOTerms, VarianceGradient
from .errors import DifflmError, loading
from .files import AtomicDir
from .modeling import TextDiffusionConfig, TextDiffusionModel, model_type
from .precision import DTYPES, autocast, check_precision, latent_dtype
from .rounding import nearest_embedding, round_to_tokens, rounding_nll
from .sampling import Sampler, as_sampler, check_request, sample


class TextLoss(NamedTuple):
    """Batch means of the text loss and its parts (per token position). A named tuple, so that DeepSpeed's ZeRO-3
    finds the tensors in a module's output and hooks their backward."""

    loss: torch.Tensor  # scalar, differentiable
    denoising: torch.Tensor  # the squared x0 error (unweighted)
    rounding: torch.Tensor
    prior: torch.Tensor
    cross_entropy: torch.Tensor  # of the x0 logits at time t against the tokens (unweighted)

    def parts(self) -> dict:
        """The parts as 0-dim tensors (read back only when logged)."""
        return {"denoising": self.denoising, "rounding": self.rounding, "prior": self.prior,
                "cross_entropy": self.cross_entropy}


class ELBOLoss(NamedTuple):
    """model.objective=elbo: the batch mean of -ELBO per token position (the loss, nats) and its terms, with the
    schedule's log-SNR endpoints (the parts logged; a named tuple, as TextLoss)."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    diffusion: torch.Tensor
    prior: torch.Tensor
    log_snr_max: torch.Tensor
    log_snr_min: torch.Tensor

    def parts(self) -> dict:
        return {"reconstruction": self.reconstruction, "diffusion": self.diffusion, "prior": self.prior,
                "log_snr_max": self.log_snr_max, "log_snr_min": self.log_snr_min}


@dataclass
class EmbeddingLatent:
    """A draw of x0 ~ q(x0 | w) = N(Emb(w), var0 I), var0 = 1 - abar_1: the embedding plus first-step noise."""

    emb: torch.Tensor  # (B, L, d)
    x0: torch.Tensor  # (B, L, d)
    var0: torch.Tensor  # (B,)


def embed_with_noise(model: TextDiffusionModel, ids: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> EmbeddingLatent:
    emb = model.embed(ids)  # (B, L, d)
    d = model.diffusion
    var0 = 1 - d.alpha_bar(d.first_t(ids.shape[0], ids.device, emb.dtype))  # (B,)
    noise = torch.randn(emb.shape, generator=generator, device=emb.device, dtype=emb.dtype)
    keep = model.diffused_positions(ids)
    if keep is not None:  # given PAD positions stay Emb(PAD): they are not latents
        noise = noise * keep[..., None]
    return EmbeddingLatent(emb=emb, x0=emb + var0.sqrt()[:, None, None] * noise, var0=var0)


def text_loss(model: TextDiffusionModel, ids: torch.Tensor, generator: Optional[torch.Generator] = None,
              attributes: Optional[torch.Tensor] = None) -> TextLoss:
    """The text objective for token ids (B, L): Diffusion-LM's end-to-end loss (Li et al. 2022, eq. 2), with the
    cross-entropy of CDCD / Plaid beside it,

        loss = mse_weight * ||x0 - x0_hat(x_t, t)||^2 + ce_weight * -log softmax(logits(x_t, t))[w]
               + rounding + prior,

    where the logits are the denoiser's own (config.output=logits, x0_hat = softmax(logits) E) or the tied
    rounding head's on x0_hat (config.output=embedding). t is uniform, or drawn through the model's TimeWarp,
    which this loss keeps fitted to the cross-entropy (the squared error where ce_weight is 0).

    The latent chain is w -> x0 -> x_1 .. x_T with q(x0 | w) = N(Emb(w), (1 - abar_1) I): the embedding plus
    the schedule's first-step noise. The ELBO of log p(w) is then (Luo 2022 eq. 45 with the extra x0 level)

        E_q[ log p(w | x0) ] + E_q[ log p(x0 | x_1) ] - sum_t KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
        - KL(q(x_T | x0) || N(0, I)) + H(q(x0 | w)).

    Each denoising KL is 1/2 (SNR_{t-1} - SNR_t) ||x0 - x0_hat||^2; like Diffusion-LM (and DDPM's L_simple) we
    drop the weights and average ||target - output||^2 over a uniformly drawn step. At the first step the decoder
    p(x0 | x_1) is scored against the embedding Emb(w), the mean of q(x0 | w), as Diffusion-LM does. The rounding
    term is the cross-entropy of the tied head on x0; the prior term is KL(q(x_T | x0) || N(0, I)) itself
    (Diffusion-LM uses abar_T ||x0||^2, twice its x0-dependent part); H(q(x0|w)) is a constant. The denoising and
    prior terms are means per latent element, the rounding term a mean per token position.

    `attributes` (B, A), for a model with config.attributes: each is dropped with probability
    config.attribute_dropout and all of them with config.unconditional_prob, so that one network learns
    p(x | any subset of the attributes) and p(x) for classifier-free guidance.
    """
    diffusion, cfg = model.diffusion, model.config
    latent = embed_with_noise(model, ids, generator)
    emb, x0, b = latent.emb, latent.x0, ids.shape[0]
    t1 = diffusion.first_t(b, ids.device, emb.dtype)
    t = training_times(model, b, generator, emb.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if attributes is not None:
        attributes = _drop_attributes(model.config, attributes, generator)
    logits = []  # the network's logits of this call (config.output=logits)
    lengths = model.lengths(ids)
    out = diffusion.denoise(_training_model_fn(model, generator, attributes, logits, lengths=lengths), x0, t, noise)
    first_step = ((emb - out.x0_hat) ** 2).mean(dim=(1, 2))
    squared = torch.where(t == t1, first_step, out.loss)  # (B,)
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.ce_weight)):  # else only logged: no graph
        logits = logits[0] if logits else model.logits(out.x0_hat).float()
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean(dim=1)  # (B,)
    if model.time_warp is not None and model.training:
        model.time_warp.update(t, ce if cfg.ce_weight else squared)
    denoising, cross_entropy = squared.mean(), ce.mean()
    rounding = rounding_nll(x0, model.rounding_weight(x0.dtype), ids, model.diffused_positions(ids)).mean() / ids.shape[1]
    prior = diffusion.prior_kl(x0).mean() / x0[0].numel()
    loss = rounding + prior
    if cfg.mse_weight:
        loss = loss + cfg.mse_weight * denoising
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * cross_entropy
    return TextLoss(loss=loss, denoising=denoising.detach(), rounding=rounding.detach(), prior=prior.detach(),
                    cross_entropy=cross_entropy.detach())


def text_elbo(model: TextDiffusionModel, ids: torch.Tensor, generator: Optional[torch.Generator] = None,
              t: Optional[torch.Tensor] = None, attributes: Optional[torch.Tensor] = None,
              variance: Optional[VarianceGradient] = None, reconstruction_rows: Optional[int] = None) -> ELBOTerms:
    """-ELBO per sequence (nats) of the likelihood objective (config.objective=elbo), in continuous time
    (Kingma et al. 2021; Plaid, Gulrajani & Hashimoto 2023):

        -log p(w) <= E_q[-log p(w | z_0)] + KL(q(z_1 | w) || N(0, I))
                     + 1/2 E_{t ~ U(0, 1)} E_q[-SNR'(t) ||x - x0_hat(z_t, t)||^2],

    with x = Emb(w) itself (no noise level between the words and x, unlike text_loss's chain),
    q(z_t | w) = N(alpha_t x, sigma_t^2 I) under the model's log-SNR schedule (finite at both ends, learned), and
    the reconstruction p(w | z_0) = prod_i softmax(logits_i(z_0, 0))[w_i]: the network's own categorical output
    at t = 0. The three terms are the core's (`GaussianDiffusion.elbo`); the sum bounds -log p(w) over every
    position of the padded sequence. With self-conditioning the network at z_t reads its own first estimate at
    the same z_t (two passes): a valid decoder, since it depends on z_t alone; half of the training batches
    and every evaluation (the sampler always self-conditions) use it.

    `t` (B,) fixes the diffusion term's time; `variance` gives the schedule's shape the variance-minimizing
    gradient (the caller hands it the diffusion term). `reconstruction_rows=k` (unconditional models) scores the
    reconstruction on the first k rows only, as (B / k) times their terms and 0 elsewhere (an unbiased estimate
    of the batch mean that costs a k-row pass instead of a B-row one; training uses it).
    """
    d, b = model.diffusion, ids.shape[0]
    x = model.embed(ids)
    logits: list = []
    model_fn = _training_model_fn(model, generator, attributes, logits, self_condition=None if model.training else True,
                                  lengths=model.lengths(ids))

    def reconstruction(fn, x0, noise):
        k = b if reconstruction_rows is None else reconstruction_rows
        t0 = d.first_t(k, x0.device, x0.dtype)
        fn(d.q_sample(x0[:k], t0, noise[:k]), t0)
        nll = F.cross_entropy(logits[-1].transpose(1, 2), ids[:k], reduction="none").sum(dim=1)  # (k,)
        return nll if k == b else torch.cat([nll * (b / k), nll.new_zeros(b - k)])

    keep = model.diffused_positions(ids)  # PAD positions given: no reconstruction or diffusion term, no prior
    return d.elbo(model_fn, x, reconstruction=reconstruction, t=t, generator=generator, variance=variance,
                  keep=None if keep is None else keep[..., None])


def is_elbo_model(model) -> bool:
    """Whether the model was trained on its ELBO (config.objective=elbo; older models lack the key)."""
    return getattr(model.config, "objective", "weighted") == "elbo"


def bound_model_fn(model: TextDiffusionModel, ids: torch.Tensor) -> Callable:
    """The network as the bound scores token ids (B, L) (metrics.text_bound): for config.objective=elbo
    self-conditioned on its own first estimate at the same x_t (as `text_elbo` evaluates), otherwise without a
    previous estimate; given their lengths (config.explicit_length)."""
    lengths = model.lengths(ids)
    if is_elbo_model(model):
        return _training_model_fn(model, None, self_condition=True, lengths=lengths)
    return lambda x, t: model(x, t, lengths=lengths)


def elbo_loss(model: TextDiffusionModel, ids: torch.Tensor, generator: Optional[torch.Generator] = None,
              attributes: Optional[torch.Tensor] = None) -> ELBOLoss:
    """The training loss of config.objective=elbo: `text_elbo` per token position, t low-discrepancy uniform in a
    batch (in the dev loss too, whose batches then cover t evenly: a steadier figure to follow), the schedule's
    shape trained for low variance (VarianceGradient), the reconstruction on an eighth of the rows in training."""
    d, b, length = model.diffusion, ids.shape[0], model.config.seq_len  # per position of the untrimmed sequence
    training = model.training and torch.is_grad_enabled()
    t = d.sample_t(b, ids.device, generator=generator, dtype=latent_dtype(model.embedding.weight),
                   low_discrepancy=True)
    variance = VarianceGradient() if training else None
    if attributes is not None:
        attributes = _drop_attributes(model.config, attributes, generator)
    terms = text_elbo(model, ids, generator, t=t, attributes=attributes, variance=variance,
                      reconstruction_rows=max(1, b // 8) if training and attributes is None else None)
    if variance is not None:
        variance.set_loss(terms.diffusion)
    hi, lo = model.diffusion.schedule.endpoints()
    total = terms.total + model.length_nll(ids).to(terms.total.dtype)  # -log p(n): a constant of the data
    return ELBOLoss(loss=total.mean() / length, reconstruction=terms.reconstruction.detach().mean() / length,
                    diffusion=terms.diffusion.detach().mean() / length, prior=terms.prior.detach().mean() / length,
                    log_snr_max=hi.detach(), log_snr_min=lo.detach())


def training_times(model: TextDiffusionModel, batch: int, generator: Optional[torch.Generator],
                   dtype: torch.dtype) -> torch.Tensor:
    """Training times (B,): uniform (diffusion.sample_t), or, for a model in training mode, through its TimeWarp; in
    discrete time a warped draw is moved up to the next step i/T (i >= 1). In eval mode (the dev loss) t stays
    uniform, so that dev losses stay comparable while the warp moves."""
    d, device = model.diffusion, model.embedding.weight.device
    if model.time_warp is None or not model.training:
        return d.sample_t(batch, device, generator=generator, dtype=dtype)
    t = model.time_warp.sample(batch, device, generator=generator, dtype=torch.float64)
    if d.discrete:
        t = torch.ceil(t * d.num_steps).clamp(1, d.num_steps) / d.num_steps
    else:
        t = d.t_min + (1 - d.t_min) * t
    return t.to(dtype)


def _drop_attributes(cfg: TextDiffusionConfig, attributes: torch.Tensor, generator) -> torch.Tensor:
    device = generator.device if generator else None
    keep = torch.rand(attributes.shape, generator=generator, device=device) >= cfg.attribute_dropout
    conditional = torch.rand(attributes.shape[:1], generator=generator, device=device) >= cfg.unconditional_prob
    return attributes * keep * conditional[:, None]


def _training_model_fn(model: TextDiffusionModel, generator: Optional[torch.Generator],
                       attributes: Optional[torch.Tensor] = None, logits: Optional[list] = None,
                       self_condition: Optional[bool] = None, lengths: Optional[torch.Tensor] = None):
    """The model as a model_fn; with self-conditioning, rows first make an x0 estimate without gradient and
    condition on it (zeros for the rest), so the network learns both to start and to refine (Chen et al. 2023):
    every row of half the batches (a coin per batch), or with config.self_condition_rows = p a share p of every
    call's rows, each drawn alone (Plaid: 0.25; the first pass runs on those rows only). `self_condition` True or
    False decides for every row instead. The network's logits (config.output=logits) of the differentiable call
    are appended to `logits`. `lengths`: see TextDiffusionModel.forward."""
    device = generator.device if generator else None
    share = getattr(model.config, "self_condition_rows", None) if self_condition is None else None
    if not model.config.self_condition or self_condition is not None:
        use = bool(model.config.self_condition and self_condition)
    else:  # rows drawn in each call, or one coin for the whole batch
        use = share is not None or bool(torch.rand((), generator=generator, device=device) < 0.5)

    def model_fn(x_t, t):
        x0_self = None
        n = None if lengths is None else lengths[: x_t.shape[0]]  # the batch's first rows (text_elbo's reconstruction)
        if use and share is None:  # every row
            x0_self = _first_estimate(model, x_t, t, attributes, n)
        elif use:  # the rows drawn now; zeros for the rest
            rows = torch.rand(x_t.shape[0], generator=generator, device=device) < share
            x0_self = torch.zeros_like(x_t)
            if rows.any():
                x0_self[rows] = _first_estimate(model, *[None if v is None else v[rows] for v in (x_t, t, attributes, n)])
        out, out_logits = model(x_t, t, x0_self=x0_self, attributes=attributes, return_logits=True, lengths=n)
        if out_logits is not None and logits is not None:
            logits.append(out_logits)
        return out

    return model_fn


@torch.no_grad()
def _first_estimate(model: TextDiffusionModel, x_t, t, attributes, lengths) -> torch.Tensor:
    """The self-conditioning pass: the network's x0 estimate without a previous one, without gradient."""
    return model.diffusion.predict_x0(model(x_t, t, attributes=attributes, lengths=lengths), x_t, t)


def sampling_temperature(model: TextDiffusionModel, temperature: Optional[float] = None) -> float:
    """The temperature to sample at: `temperature`, or the model's default (config.sample_temperature, set by
    model.sample_temperature in training) where None; a one-line error for one the model cannot take."""
    if temperature is None:
        return getattr(model.config, "sample_temperature", 1.0)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise DifflmError(f"--temperature must be a positive number, got {temperature}")
    if temperature != 1 and model.config.output != "logits":
        raise DifflmError("--temperature needs a model with categorical output (model.output=logits); this one "
                          "regresses x0 directly")
    return temperature


class SamplingModelFn:
    """The model as a model_fn for a sampler. With self-conditioning it feeds back its previous x0 estimate;
    with `attributes` (B, A) and a weight w it applies classifier-free guidance (Ho & Salimans 2022),
    (1 + w) out(x | attributes) - w out(x), affine in the output so the same for every parameterization.
    A `temperature` tau (config.output=logits; None: the model's config.sample_temperature) takes
    x0 = softmax(logits / tau) E, fed back as well; tau < 1 trades diversity for fluency (Plaid samples with a
    score temperature of the same purpose)."""

    def __init__(self, model: TextDiffusionModel, attributes: Optional[torch.Tensor] = None, weight: float = 0.0,
                 net: Optional[Callable] = None, temperature: Optional[float] = None):
        self.model, self.previous = model, None
        self.attributes, self.weight = attributes, weight
        self.temperature = sampling_temperature(model, temperature)
        self.net = net or model  # the forward to call (a compiled one, see compiled_network)
        self.logits = None  # config.output=logits: the logits of the latest call (guided like the output)
        self.lengths = None  # config.explicit_length: the batch's lengths (B,), set by sample_ids

    def output(self, x_t, t, x0_self=None):
        """(output, logits or None), guided alike: classifier-free guidance gives (1 + w) l(x | a) - w l(x)."""
        out, logits = self.net(x_t, t, x0_self=x0_self, attributes=self.attributes, return_logits=True,
                               lengths=self.lengths)
        if self.attributes is not None and self.weight:
            free, free_logits = self.net(x_t, t, x0_self=x0_self, return_logits=True, lengths=self.lengths)
            out = (1 + self.weight) * out - self.weight * free
            logits = None if logits is None else (1 + self.weight) * logits - self.weight * free_logits
        if self.temperature != 1:  # x0 = softmax(logits / temperature) E, from the (guided) logits
            out = self.model.expected_embedding(logits, x_t.dtype, self.temperature)
        return out, logits

    def x0(self, x_t, t):
        """The x0 estimate at (x_t, t) without advancing the self-conditioning state (for guides)."""
        prev = None if self.previous is None else self.previous.detach()
        return self.model.diffusion.predict_x0(self.output(x_t, t, prev)[0], x_t, t)

    def __call__(self, x_t, t):
        out, self.logits = self.output(x_t, t, self.previous)
        if self.model.config.self_condition:
            self.previous = self.model.diffusion.predict_x0(out, x_t, t)
        return out


def trim_given_pad(model: TextDiffusionModel, ids: torch.Tensor) -> torch.Tensor:
    """ids (B, L) cut after the batch's longest row for a config.explicit_length model, whose PAD positions are
    given and masked from attention: the loss is the same, at the cost of the positions that remain."""
    n = model.lengths(ids)
    return ids if n is None else ids[:, : int(n.max())]


class TextObjective(torch.nn.Module):
    """`text_loss` as a module, so that an engine can wrap it: under ZeRO-3 the whole loss then runs inside one
    forward, where the embedding (read again by the tied rounding head) can be gathered as an external parameter."""

    def __init__(self, model: TextDiffusionModel):
        super().__init__()
        self.model = model

    def forward(self, rows: torch.Tensor, generator: Optional[torch.Generator] = None) -> TextLoss:
        """`rows`: token ids (B, L), followed by the 0/1 attribute vector (B, A) for a conditional model."""
        cfg = self.model.config
        loss = elbo_loss if is_elbo_model(self.model) else text_loss
        ids, attributes = rows[:, : cfg.seq_len], rows[:, cfg.seq_len:].float() if cfg.attributes else None
        return loss(self.model, trim_given_pad(self.model, ids), generator, attributes)

    def external_parameters(self):
        return [self.model.embedding.weight]


@dataclass
class Sample:
    text: str
    ids: List[int]


@dataclass
class BatchControl:
    """What controls one batch of samples: the model_fn (classifier-free guidance), the sampler's guide hook,
    a transform of each x0 estimate, and token ids fixed in the output ((B, L), -1 where free: the tokens the
    transform writes into x0, which rounding of an imperfect embedding could otherwise change); None leaves that
    part as in plain sampling."""

    model_fn: Optional[SamplingModelFn] = None
    guide: Optional[Callable] = None
    denoise_fn: Optional[Callable] = None
    fixed: Optional[torch.Tensor] = None
    lengths: Optional[tuple] = None  # config.explicit_length: (low, high) (B,) bounds on the drawn lengths


def meaning_control(model: TextDiffusionModel, meanings: List[str], weight: float = 0.0) -> Callable:
    """The `control` of `generate` for data-to-text: sample i is drawn from p(x | meanings[i mod n]), the
    meaning representation's field=value pairs as the model was conditioned on them in training
    (model.attributes). `weight` w > 0 sharpens it by classifier-free guidance, (1 + w) out(x | a) - w out(x)
    (SamplingModelFn); w = 0 samples the conditional model as trained."""
    if not model.config.attributes:
        raise DifflmError("--meanings needs a model trained on meaning representations (model.attributes=true)")
    if not meanings:
        raise DifflmError("--meanings gave no meaning representations (one per line, e.g. name[The Eagle], food[French])")
    if not math.isfinite(weight) or weight < 0:
        raise DifflmError(f"the guidance weight must be a number >= 0, got {weight}")
    vectors = attribute_vectors(meanings, model.config.attributes, strict=True).float()
    vectors = vectors.to(model.embedding.weight.device)

    def control(a: int, b: int, model_fn: SamplingModelFn) -> BatchControl:
        rows = vectors[torch.arange(a, b) % len(meanings)]
        return BatchControl(model_fn=SamplingModelFn(model, rows, weight, net=model_fn.net,
                                                     temperature=model_fn.temperature))
    return control


@torch.no_grad()
def generate(model: TextDiffusionModel, tokenizer, num_samples: int, steps: Optional[int] = None,
             sampler: Union[str, Sampler] = "ddpm", clamp: bool = False, seed: int = 0, batch_size: int = 64,
             progress: Optional[Callable[[int], None]] = None, callback: Optional[Callable] = None,
             control: Optional[Callable[[int, int, SamplingModelFn], BatchControl]] = None,
             precision: str = "fp32", compile: bool = False, from_logits: bool = True,
             temperature: Optional[float] = None) -> List[Sample]:
    """Fixed-length samples decoded by argmax (of the last step's logits for a model with config.output=logits
    unless not `from_logits`, else of the rounding head), START dropped, cut at END.

    `sampler`: a sampling.Sampler (update, order, time grid) or its name: ddpm (ancestral), ddim (eta = 0) or
    dpm++ (DPM-Solver++, order 2), on the uniform grid. `clamp`: replace each x0 estimate by its nearest word
    embeddings (Diffusion-LM's clamping trick). `progress(n)` is called after each batch of n samples;
    `callback(StepState)` after every sampler step (see sampling.sample). `control(start, stop, model_fn)`
    gives the BatchControl of samples start..stop-1 (control.py). `precision=bf16` runs the network under bf16
    autocast (a CUDA GPU; the sampler's arithmetic stays fp32); `compile` runs it through torch.compile (with CUDA
    graphs on a GPU). `temperature`: see SamplingModelFn (None: the model's default).
    """
    sampler = as_sampler(sampler)
    check_request(model.diffusion, num_samples, steps, batch_size, sampler=sampler, warp=model.time_warp)
    check_precision(precision, "--precision")
    temperature = sampling_temperature(model, temperature)
    if compile and control is not None:
        raise DifflmError("compiled sampling is for unguided generation; drop --compile with control or --meanings")
    model.eval()
    net = compiled_network(model) if compile else model
    generator = torch.Generator(device=model.embedding.weight.device).manual_seed(seed)
    out: List[Sample] = []
    while len(out) < num_samples:
        b = min(batch_size, num_samples - len(out))
        model_fn, ctl = SamplingModelFn(model, net=net, temperature=temperature), BatchControl()
        if control is not None:
            ctl = control(len(out), len(out) + b, model_fn)
        ids = sample_ids(model, ctl.model_fn or model_fn, b, steps=steps, sampler=sampler, clamp=clamp,
                         generator=generator, guide=ctl.guide, denoise_fn=ctl.denoise_fn, callback=callback,
                         network_dtype=DTYPES[precision], from_logits=from_logits, lengths=ctl.lengths)
        if ctl.fixed is not None:
            ids = torch.where(ctl.fixed >= 0, ctl.fixed, ids)
        for row in ids.tolist():
            out.append(Sample(text=decode(row, tokenizer), ids=row))
        if progress:
            progress(b)
    return out


def sample_ids(model: TextDiffusionModel, model_fn: Callable, batch: int, steps: Optional[int] = None,
               sampler: Union[str, Sampler] = "ddpm", clamp: bool = False,
               generator: Optional[torch.Generator] = None,
               guide: Optional[Callable] = None, denoise_fn: Optional[Callable] = None,
               callback: Optional[Callable] = None, network_dtype: Optional[torch.dtype] = None,
               from_logits: bool = True, lengths: Optional[tuple] = None) -> torch.Tensor:
    """One batch of token ids (B, L): the sampler from x_T ~ N(0, I) in the latent dtype, then the argmax of the
    last step's logits (config.output=logits, unless not `from_logits`) or of the rounding head on the final x0
    (in the latent dtype too). `denoise_fn` transforms each x0 estimate before the clamping trick (when `clamp`);
    `network_dtype` (bf16) autocasts the sampler's steps, whose own arithmetic stays in fp32.

    A config.explicit_length model first draws each sample's length n ~ p(n) (within `lengths` = (low, high) where
    given) and samples the words given it; without guides, at the width of the batch's longest sample."""
    sampler = as_sampler(sampler)
    cfg, weight = model.config, model.embedding.weight
    width = cfg.seq_len
    if getattr(cfg, "explicit_length", False):
        model_fn.lengths = model.draw_lengths(batch, generator, *(lengths or ()))
        if guide is None and denoise_fn is None:
            width = int(model_fn.lengths.max())

    def clamp_fn(x0, t):  # outside autocast: the nearest-embedding search is part of the sampler's arithmetic
        with torch.autocast(weight.device.type, enabled=False):
            return nearest_embedding(x0, model.rounding_weight(x0.dtype))

    with autocast(weight.device.type, network_dtype):
        x = sample(model.diffusion, model_fn, (batch, width, cfg.embed_dim), steps=steps,
                   sampler=sampler, denoise_fn=_chain(denoise_fn, clamp_fn if clamp else None), guide=guide,
                   generator=generator, device=weight.device, dtype=latent_dtype(weight), callback=callback,
                   warp=model.time_warp)
    ids = estimate_ids(model, model_fn, x, from_logits=from_logits)
    return torch.nn.functional.pad(ids, (0, cfg.seq_len - width), value=cfg.pad_id)


def estimate_ids(model: TextDiffusionModel, model_fn: Callable, x0_hat: torch.Tensor,
                 from_logits: bool = True) -> torch.Tensor:
    """The token ids (B, width) of a sampler step's x0 estimate, decoded as the samples are: the argmax of that
    step's logits (config.output=logits, unless not `from_logits`) or of the rounding head on `x0_hat`; PAD beyond
    each sample's drawn length for a config.explicit_length model."""
    logits = getattr(model_fn, "logits", None)
    if from_logits and logits is not None:  # the step's logits: the most likely word at each position
        ids = logits.argmax(dim=-1)
    else:
        ids = round_to_tokens(x0_hat, model.rounding_weight(x0_hat.dtype))
    lengths = getattr(model_fn, "lengths", None)
    if lengths is not None:
        beyond = torch.arange(ids.shape[1], device=ids.device)[None] >= lengths[:, None]
        ids = ids.masked_fill(beyond, model.config.pad_id)
    return ids


def compiled_network(model: torch.nn.Module) -> Callable:
    """The model's forward through torch.compile; on CUDA with CUDA graphs (mode reduce-overhead), which replay the
    whole network as one launch. A replay reuses its output buffers, so each output is cloned before it is kept.
    Called as SamplingModelFn calls it, with return_logits=True."""
    cuda = next(model.parameters()).is_cuda
    fn = torch.compile(model, mode="reduce-overhead" if cuda else None)

    def net(*args, **kwargs):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return tuple(o if o is None else o.clone() for o in fn(*args, **kwargs))  # (output, logits or None)

    return net


def _chain(first: Optional[Callable], then: Optional[Callable]) -> Optional[Callable]:
    if first is None or then is None:
        return first or then
    return lambda x0, t: then(first(x0, t), t)


# ---- model directories -------------------------------------------------------------------------------------------
def save_model(model, tokenizer, path, extra_files: Optional[dict] = None) -> None:
    """save_pretrained of a Hugging Face model (the text model, a teacher) + config + tokenizer into `path`,
    atomically, with any extra text files."""
    with AtomicDir(Path(path)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:  # image models have none
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_model(path, device="cpu", warn_unfinished: bool = True):
    """(model, tokenizer) from a directory written by `save_model`; no network. `warn_unfinished`: log a warning
    when the card says the model was saved before train.max_steps (off where only the tokenizer and the length are
    used: those are fixed from a run's first save)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise DifflmError(f"model directory {path} does not exist; train one with `difflm train`")
    if model_type(p) != TextDiffusionConfig.model_type:
        raise DifflmError(f"{path} is not a difflm model directory (no config.json with model_type "
                          f"{TextDiffusionConfig.model_type!r}); give the out_dir of `difflm train`")
    with loading(p, "diffusion model"):
        model = TextDiffusionModel.from_pretrained(p, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if warn_unfinished:
        warn_if_unfinished(p)
    check = getattr(model.diffusion.schedule, "check_endpoints", None)
    if check is not None:  # a learned schedule: refuse one whose endpoints training moved across each other
        check(f"model {path}")
    return model.eval(), tokenizer
