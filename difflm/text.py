"""The text objective of Diffusion-LM on the generic core, text generation, and model directories."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from .data import decode
from .errors import DifflmError
from .files import AtomicDir
from .modeling import TextDiffusionConfig, TextDiffusionModel
from .rounding import nearest_embedding, round_to_tokens, rounding_nll
from .sampling import sample


@dataclass
class TextLoss:
    """Batch means of Diffusion-LM's end-to-end loss and its parts (per token position)."""

    loss: torch.Tensor  # scalar, differentiable
    denoising: torch.Tensor
    rounding: torch.Tensor
    prior: torch.Tensor


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
    return EmbeddingLatent(emb=emb, x0=emb + var0.sqrt()[:, None, None] * noise, var0=var0)


def text_loss(model: TextDiffusionModel, ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> TextLoss:
    """Diffusion-LM's end-to-end objective (Li et al. 2022, eq. 2) for token ids (B, L).

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
    """
    diffusion = model.diffusion
    latent = embed_with_noise(model, ids, generator)
    emb, x0, b = latent.emb, latent.x0, ids.shape[0]
    t1 = diffusion.first_t(b, ids.device, emb.dtype)
    t = diffusion.sample_t(b, ids.device, generator=generator, dtype=emb.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    out = diffusion.denoise(_training_model_fn(model, generator), x0, t, noise)
    first_step = ((emb - out.x0_hat) ** 2).mean(dim=(1, 2))
    denoising = torch.where(t == t1, first_step, out.loss).mean()
    rounding = rounding_nll(x0, model.embedding.weight, ids).mean() / ids.shape[1]
    prior = diffusion.prior_kl(x0).mean() / x0[0].numel()
    return TextLoss(loss=denoising + rounding + prior, denoising=denoising.detach(), rounding=rounding.detach(),
                    prior=prior.detach())


def _training_model_fn(model: TextDiffusionModel, generator: Optional[torch.Generator]):
    """The model as a model_fn; with self-conditioning, half the batches first make an x0 estimate without
    gradient and condition on it, so the network learns both to start and to refine (Chen et al. 2023)."""
    if not model.config.self_condition:
        return model
    use = torch.rand((), generator=generator, device=generator.device if generator else None) < 0.5

    def model_fn(x_t, t):
        if not use:
            return model(x_t, t)
        with torch.no_grad():
            x0_self = model.diffusion.predict_x0(model(x_t, t), x_t, t)
        return model(x_t, t, x0_self=x0_self)

    return model_fn


class _SamplingModelFn:
    """The model as a model_fn for a sampler; with self-conditioning it feeds back its previous x0 estimate."""

    def __init__(self, model: TextDiffusionModel):
        self.model, self.previous = model, None

    def __call__(self, x_t, t):
        if not self.model.config.self_condition:
            return self.model(x_t, t)
        out = self.model(x_t, t, x0_self=self.previous)
        self.previous = self.model.diffusion.predict_x0(out, x_t, t)
        return out


class TextObjective(torch.nn.Module):
    """`text_loss` as a module, so that an engine can wrap it: under ZeRO-3 the whole loss then runs inside one
    forward, where the embedding (read again by the tied rounding head) can be gathered as an external parameter."""

    def __init__(self, model: TextDiffusionModel):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> TextLoss:
        return text_loss(self.model, ids, generator=generator)

    def external_parameters(self):
        return [self.model.embedding.weight]


@dataclass
class Sample:
    text: str
    ids: List[int]


@torch.no_grad()
def generate(model: TextDiffusionModel, tokenizer, num_samples: int, steps: Optional[int] = None,
             sampler: str = "ddpm", clamp: bool = False, seed: int = 0, batch_size: int = 64,
             progress: Optional[Callable[[int], None]] = None, callback: Optional[Callable] = None) -> List[Sample]:
    """Fixed-length samples decoded through the rounding head (argmax), START dropped, cut at END.

    `sampler`: ddpm (ancestral) or ddim (eta = 0). `clamp`: replace each x0 estimate by its nearest word
    embeddings (Diffusion-LM's clamping trick). `progress(n)` is called after each batch of n samples;
    `callback(StepState)` after every sampler step (see sampling.sample).
    """
    if num_samples < 1:
        raise DifflmError(f"--num-samples must be positive, got {num_samples}")
    if batch_size < 1:
        raise DifflmError(f"--batch-size must be positive, got {batch_size}")
    if sampler not in ("ddpm", "ddim"):
        raise DifflmError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    model.eval()
    cfg = model.config
    weight = model.embedding.weight
    denoise_fn = (lambda x0, t: nearest_embedding(x0, weight)) if clamp else None
    eta = 1.0 if sampler == "ddpm" else 0.0
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    out: List[Sample] = []
    while len(out) < num_samples:
        b = min(batch_size, num_samples - len(out))
        x = sample(model.diffusion, _SamplingModelFn(model), (b, cfg.seq_len, cfg.embed_dim), steps=steps, eta=eta,
                   denoise_fn=denoise_fn, generator=generator, device=weight.device, dtype=weight.dtype,
                   callback=callback)
        for row in round_to_tokens(x, weight).tolist():
            out.append(Sample(text=decode(row, tokenizer), ids=row))
        if progress:
            progress(b)
    return out


# ---- model directories -------------------------------------------------------------------------------------------
def save_model(model, tokenizer, path, extra_files: Optional[dict] = None) -> None:
    """save_pretrained of a Hugging Face model (the text model, a teacher) + config + tokenizer into `path`,
    atomically, with any extra text files."""
    with AtomicDir(Path(path)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_model(path, device="cpu"):
    """(model, tokenizer) from a directory written by `save_model`; no network."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise DifflmError(f"model directory {path} does not exist; train one with `difflm train`")
    cfg_file = p / "config.json"
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None
    except json.JSONDecodeError:
        model_type = None
    if model_type != TextDiffusionConfig.model_type:
        raise DifflmError(f"{path} is not a difflm model directory (no config.json with model_type "
                          f"{TextDiffusionConfig.model_type!r}); give the out_dir of `difflm train`")
    model = TextDiffusionModel.from_pretrained(p, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model.eval(), tokenizer
