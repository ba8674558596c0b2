"""Hugging Face classes of the text model: TextDiffusionConfig / TextDiffusionModel.

The model holds the word embedding (the space diffusion runs in), a BERT-style transformer denoiser built from
transformers' configuration classes, input/output projections, a sinusoidal time embedding, the rounding head
(tied to the embedding) and its GaussianDiffusion, so `from_pretrained` rebuilds everything from the directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import (BertConfig, BertModel, PretrainedConfig, PreTrainedModel, RobertaPreLayerNormConfig,
                          RobertaPreLayerNormModel)

from .diffusion import GaussianDiffusion, TimeWarp
from .errors import DifflmError
from .precision import latent_dtype
from .rounding import rounding_logits
from .schedules import get_schedule


class TextDiffusionConfig(PretrainedConfig):
    model_type = "difflm-text"

    def __init__(self, vocab_size: int = 100, seq_len: int = 64, embed_dim: int = 16, hidden_size: int = 768,
                 num_layers: int = 12, num_heads: int = 12, intermediate_size: int = 3072, dropout: float = 0.1,
                 schedule: str = "sqrt", num_steps: int = 2000, prediction: str = "x0",
                 start_id: int = 0, end_id: int = 1, pad_id: int = 2, denoiser_attn: str = "sdpa",
                 self_condition: bool = False, attributes: Optional[list] = None, attribute_dropout: float = 0.5,
                 unconditional_prob: float = 0.1, output: str = "embedding", embedding_norm: bool = False,
                 log_snr_max: float = 10.0, log_snr_min: float = -10.0, noise_scale: float = 1.0,
                 time_warp_bins: int = 0, mse_weight: float = 1.0, ce_weight: float = 0.0,
                 sample_temperature: float = 1.0, objective: str = "weighted", posterior_logits: bool = False,
                 explicit_length: bool = False, log_snr_max_floor: Optional[float] = None, time_input: str = "t",
                 self_condition_rows: Optional[float] = None, zero_init_output: bool = False,
                 denoiser: str = "bert", **kwargs):
        self.vocab_size, self.seq_len, self.embed_dim = vocab_size, seq_len, embed_dim
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.intermediate_size, self.dropout = intermediate_size, dropout
        self.schedule, self.num_steps, self.prediction = schedule, num_steps, prediction
        self.start_id, self.end_id, self.pad_id = start_id, end_id, pad_id
        self.denoiser_attn, self.self_condition = denoiser_attn, self_condition
        # classifier-free guidance: the `field=value` attributes the model is conditioned on (empty: none)
        self.attributes = list(attributes or [])
        self.attribute_dropout, self.unconditional_prob = attribute_dropout, unconditional_prob
        self.output, self.embedding_norm = output, embedding_norm  # the denoiser's head; E's normalisation
        self.log_snr_max, self.log_snr_min, self.noise_scale = log_snr_max, log_snr_min, noise_scale
        self.log_snr_max_floor = log_snr_max_floor  # the learned log_snr(0) kept above it (schedules.Learned)
        self.time_warp_bins = time_warp_bins  # 0: uniform t in training
        self.mse_weight, self.ce_weight = mse_weight, ce_weight  # the training loss (text.text_loss)
        self.sample_temperature = sample_temperature  # the default sampling temperature (text.SamplingModelFn)
        self.objective = objective  # weighted or elbo (text.text_loss / text.text_elbo)
        self.posterior_logits = posterior_logits  # logits += the exact posterior's (TextDiffusionModel.forward)
        self.explicit_length = explicit_length  # p(length) p(words | length): PAD given, not diffused (forward)
        self.time_input = time_input  # t or log_snr: the noise level the network reads (TextDiffusionModel.noise_input)
        self.self_condition_rows = self_condition_rows  # None: half the batches self-condition; p: that share of rows
        self.zero_init_output = zero_init_output  # the head's last layer starts at zero (TextDiffusionModel)
        self.denoiser = denoiser  # bert (post-LN, Diffusion-LM's) or prenorm (pre-LN; build_encoder)
        super().__init__(**kwargs)

    def build_schedule(self):
        return get_schedule(self.schedule, self.log_snr_max, self.log_snr_min, self.noise_scale,
                            getattr(self, "log_snr_max_floor", None))

    def build_denoiser(self) -> PreTrainedModel:
        """The transformer between the input projection and the head (`build_encoder` of `denoiser`)."""
        return build_encoder(self.denoiser, self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size,
                             self.dropout, self.seq_len, self.denoiser_attn)


def build_encoder(kind: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                  dropout: float, seq_len: int, attn: str = "sdpa") -> PreTrainedModel:
    """A transformer encoder on input embeddings (no vocabulary, no pooler), for the denoiser and the noisy-latent
    classifiers. `bert`: BERT's post-LN encoder (Diffusion-LM's denoiser; LayerNorm after each residual sum).
    `prenorm`: the same encoder with the LayerNorm before each sublayer and one after the last (transformers'
    RobertaPreLayerNorm; the residual stream is never normalised), the block of GPT-2, CDCD and Plaid, reported to
    train at higher learning rates without warm-up trouble (Xiong et al. 2020). Both add learned absolute positions
    and a LayerNorm to the input."""
    common = dict(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  intermediate_size=intermediate_size, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, type_vocab_size=1, attn_implementation=attn)
    if kind == "prenorm":  # positions 1..L (0 is the position padding index)
        config = RobertaPreLayerNormConfig(max_position_embeddings=seq_len + 1, pad_token_id=0, bos_token_id=None,
                                           eos_token_id=None, **common)
        return RobertaPreLayerNormModel(config, add_pooling_layer=False)
    return BertModel(BertConfig(max_position_embeddings=seq_len, **common), add_pooling_layer=False)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Sequential):
    """An MLP on the sinusoidal features of t: (B,) -> (B, H) (a Sequential, so weights keep their names)."""

    def __init__(self, hidden_size: int):
        super().__init__(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.hidden_size = hidden_size

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, H) in the network's weight dtype (bf16/fp16 where DeepSpeed casts the weights)."""
        return self(timestep_embedding(t, self.hidden_size).to(self[0].weight.dtype))


class TextDiffusionModel(PreTrainedModel):
    config_class = TextDiffusionConfig
    base_model_prefix = "difflm"
    _supports_sdpa = True

    def __init__(self, config: TextDiffusionConfig):
        super().__init__(config)
        d, h = config.embed_dim, config.hidden_size
        self.embedding = nn.Embedding(config.vocab_size, d)
        d_in = 2 * d if config.self_condition else d  # self-conditioning also reads the previous x0 estimate
        self.input_proj = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, h))
        self.time_embed = TimeEmbedding(h)
        # a multi-hot attribute vector, added to the time embedding; all zeros is the unconditional model
        self.attribute_embed = nn.Linear(len(config.attributes), h, bias=False) if config.attributes else None
        self.denoiser = config.build_denoiser()
        # the head: x0 itself (Diffusion-LM), or logits over the vocabulary whose expected embedding is x0 (CDCD)
        out = config.vocab_size if config.output == "logits" else d
        self.output_proj = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, out))
        self.diffusion = GaussianDiffusion(config.build_schedule(), config.num_steps, config.prediction)
        self.time_warp = TimeWarp(config.time_warp_bins) if config.time_warp_bins else None
        if getattr(config, "explicit_length", False):  # log p(n) of the n = 0..L non-PAD positions (set_lengths)
            self.register_buffer("length_log_prob", torch.full((config.seq_len + 1,), -math.log(config.seq_len + 1)))
        # training only: a 0-dim tensor that scales the posterior logits (train.posterior_warmup_steps); None: 1
        self.posterior_scale: Optional[torch.Tensor] = None
        self.post_init()

    def _init_weights(self, module):
        if getattr(self.config, "zero_init_output", False) and module is self.output_proj[-1]:
            nn.init.zeros_(module.weight)  # Plaid: a new network adds nothing to the posterior bias (or predicts 0)
            nn.init.zeros_(module.bias)
        elif module is self.embedding:
            nn.init.normal_(module.weight, std=1.0)  # Diffusion-LM keeps nn.Embedding's N(0, 1)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def lr_groups(self) -> dict:
        """The parameters that train.embedding_lr and train.schedule_lr address (engines.param_groups)."""
        return {"embedding": [self.embedding.weight], "schedule": list(self.diffusion.schedule.parameters())}

    def set_lengths(self, ids: torch.Tensor, smoothing: float = 0.5) -> None:
        """p(n), the distribution of a sequence's non-PAD positions n (START, words, END) of config.explicit_length,
        from training ids (N, L): counts plus `smoothing` on every n from 2 (START, END) to L, so that the bound of
        a length never seen in training stays finite."""
        n = self.lengths(ids)
        counts = torch.bincount(n.cpu(), minlength=self.config.seq_len + 1).double()
        counts[2:] += smoothing
        self.length_log_prob.copy_(torch.log(counts / counts.sum()).to(self.length_log_prob))

    def lengths(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The non-PAD positions of each row of ids (B, L) for a config.explicit_length model, else None."""
        keep = self.diffused_positions(ids)
        return None if keep is None else keep.sum(1)

    def diffused_positions(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, L) true where a position is a latent of the diffusion: all of them, or (config.explicit_length) the
        non-PAD ones; None when all are."""
        return ids != self.config.pad_id if getattr(self.config, "explicit_length", False) else None

    def length_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """-log p(n) (B,) of each row's length (config.explicit_length; zeros otherwise: the length is diffused)."""
        n = self.lengths(ids)
        if n is None:
            return torch.zeros(ids.shape[0], device=ids.device)
        return -self.length_log_prob.float()[n]

    def draw_lengths(self, batch: int, generator: Optional[torch.Generator] = None,
                     low: Optional[torch.Tensor] = None, high: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n ~ p(n) (B,), each restricted to [low, high] where given (a controlled length) and renormalised."""
        n = torch.arange(self.config.seq_len + 1, device=self.length_log_prob.device)
        log_p = self.length_log_prob.float().expand(batch, -1)
        if low is not None:
            log_p = log_p.masked_fill(n[None] < low.to(n.device)[:, None], -math.inf)
        if high is not None:
            log_p = log_p.masked_fill(n[None] > high.to(n.device)[:, None], -math.inf)
        if not torch.isfinite(log_p).any(1).all():
            raise DifflmError("the length constraints of a sample leave no length possible (they contradict each "
                              f"other or exceed the model's {self.config.seq_len} positions)")
        u = torch.rand(batch, generator=generator, device=generator.device if generator else n.device)
        cdf = torch.cumsum(torch.softmax(log_p, -1), -1)
        return torch.searchsorted(cdf, u.to(cdf.device)[:, None], right=True).squeeze(1).clamp(max=self.config.seq_len)

    def embedding_matrix(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """E (V, d), the word embeddings diffusion runs on, in `dtype` (default: the latent dtype). With
        config.embedding_norm each row is e_w / ||e_w|| * sqrt(d) (CDCD, Dieleman et al. 2022, sec. 3.2): of the
        norm of a standard normal vector, so that training can neither shrink the embeddings below the noise
        (which makes denoising trivial and the rounding ambiguous) nor inflate them."""
        weight = self.embedding.weight.to(dtype or latent_dtype(self.embedding.weight))
        if not self.config.embedding_norm:
            return weight
        return nn.functional.normalize(weight, dim=-1) * math.sqrt(self.config.embed_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Emb(w) in the latent dtype (fp32 also when the weights are bf16): (B, L) -> (B, L, d)."""
        return nn.functional.embedding(ids, self.embedding_matrix())

    def rounding_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The tied rounding head's matrix E (V, d) in the latents' dtype."""
        return self.embedding_matrix(dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return rounding_logits(x, self.rounding_weight(x.dtype))  # (B, L, V)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x0_self: Optional[torch.Tensor] = None,
                attributes: Optional[torch.Tensor] = None, return_logits: bool = False,
                lengths: Optional[torch.Tensor] = None):
        """The denoiser's output (an x0 / eps / score / v prediction per config.prediction): (B, L, d).

        With config.output=logits the network outputs logits (B, L, V) over the vocabulary at every position, and
        its x0 estimate is the expected embedding under them (CDCD's score interpolation, Dieleman et al. 2022
        eq. 3; Plaid's categorical reparameterization):

            x0_hat(x_t, t) = softmax(logits(x_t, t)) E,

        returned like any x0 prediction (so sampling, clamping, guidance and the bound take it unchanged);
        `return_logits` returns (output, logits) with the logits in fp32 (None for config.output=embedding).

        With `config.self_condition` (Chen et al. 2023, "Analog Bits") the network also reads `x0_self`, its own
        previous estimate of x0 (zeros when absent). A model with `config.attributes` reads `attributes`, a
        (B, A) multi-hot vector of the wanted `field=value` pairs (None: unconditional). The network runs in its
        weights' dtype; the output has the dtype of x_t.

        `lengths` (B,) (config.explicit_length, prediction x0): row b has PAD from position lengths[b] on. Those
        positions are given, not diffused: attention does not read them and their x0 estimate is Emb(PAD) exactly
        (logits one-hot on PAD), so they add nothing to any loss or bound; the other positions never take PAD.
        """
        temb = self.time_embed.embed(self.noise_input(t))  # (B, H)
        if self.attribute_embed is not None and attributes is not None:
            temb = temb + self.attribute_embed(attributes.to(temb.dtype))
        x = x_t
        if self.config.self_condition:
            x = torch.cat([x_t, torch.zeros_like(x_t) if x0_self is None else x0_self.to(x_t.dtype)], -1)  # (B, L, 2d)
        h = self.input_proj(x.to(temb.dtype)) + temb[:, None, :]  # (B, L, H); BERT adds positions + LayerNorm
        pad = None if lengths is None else torch.arange(x_t.shape[1], device=x_t.device)[None] >= lengths[:, None]
        mask = None if pad is None else (~pad).long()
        h = self.denoiser(inputs_embeds=h, attention_mask=mask).last_hidden_state  # (B, L, H)
        out = self.output_proj(h)  # (B, L, d), or (B, L, V) logits
        if self.config.output != "logits":
            out = out.to(x_t.dtype)
            if pad is not None:
                out = torch.where(pad[..., None], self.embedding_matrix(out.dtype)[self.config.pad_id], out)
            return (out, None) if return_logits else out
        logits = out.float()
        if getattr(self.config, "posterior_logits", False):
            posterior = self.posterior_logits(x_t, t)
            if self.training and self.posterior_scale is not None:  # warming up (train.posterior_warmup)
                posterior = self.posterior_scale * posterior
            logits = logits + posterior
        if pad is not None:  # PAD where given (softmax exactly one-hot), never elsewhere
            is_pad = torch.arange(logits.shape[-1], device=logits.device) == self.config.pad_id  # (V,)
            logits = torch.where(pad[..., None], torch.where(is_pad, 0.0, -1e4), logits.masked_fill(is_pad, -1e4))
        x0 = self.expected_embedding(logits, x_t.dtype)
        return (x0, logits) if return_logits else x0

    def noise_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the network reads as its noise level (B,): t itself, or with config.time_input=log_snr the
        schedule's log-SNR at t mapped affinely onto the unit interval by the config's endpoints (the learned
        schedule's starting ones),

            s = (log_snr_max - log_snr(t)) / (log_snr_max - log_snr_min),

        so s ~ t for a learned schedule at initialisation (all but linear in log-SNR), and the network is a function
        of (x_t, log-SNR), as in VDM (Kingma et al. 2021, whose continuous-time ELBO is invariant to the schedule
        between its endpoints only for such a network) and Plaid: moving the learned schedule no longer changes
        which noise level a t stands for. Detached from the schedule, as the posterior logits are: the schedule's
        gradient through the network's input vanishes in expectation for a denoiser trained at the true level."""
        if getattr(self.config, "time_input", "t") == "t":
            return t
        cfg = self.config
        with torch.no_grad():  # no graph through the schedule
            log_snr = self.diffusion.schedule.log_snr(t)
        return ((cfg.log_snr_max - log_snr) / (cfg.log_snr_max - cfg.log_snr_min)).to(t.dtype)

    def posterior_logits(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(w_i | x_t) up to a constant for a uniform prior over words, position by position (B, L, V):

            log N(x_t; alpha_t e_w, sigma_t^2 I) = alpha_t / sigma_t^2 x_t . e_w - alpha_t^2 / (2 sigma_t^2) ||e_w||^2 + c,

        alpha_t^2 = alpha_bar(t), sigma_t^2 = 1 - alpha_bar(t). Added to the network's logits
        (config.posterior_logits, Plaid's output bias), it makes the network learn only the context's correction
        to the exact single-position posterior, which dominates at low noise, where the ELBO weights are largest.
        The embeddings and x_t get gradients through it (the posterior sharpens as the embeddings part, which is
        what holds them apart against the diffusion term); the schedule does not."""
        a = self.diffusion.alpha_bar(t).detach().float()  # (B,)
        e = self.embedding_matrix(torch.float32)
        scale = (a.sqrt() / (1 - a))[:, None, None]
        return scale * (x_t.float() @ e.T) - (a / (2 * (1 - a)))[:, None, None] * (e * e).sum(-1)

    def expected_embedding(self, logits: torch.Tensor, dtype: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
        """softmax(logits / temperature) E: (B, L, d), the x0 estimate of a categorical output. A temperature
        below 1 sharpens it towards the most likely words (a sampling option; training uses 1)."""
        return torch.softmax(logits / temperature if temperature != 1 else logits, dim=-1).to(dtype) \
            @ self.embedding_matrix(dtype)


def register_auto_classes(config_class, model_class) -> None:
    """Let AutoConfig / AutoModel (and AutoTokenizer, which reads config.json) recognise a difflm directory."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)


def model_type(path) -> Optional[str]:
    """The `model_type` in a model directory's config.json, or None (no such file, or not a JSON object)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


register_auto_classes(TextDiffusionConfig, TextDiffusionModel)
