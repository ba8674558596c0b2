"""Noisy classifiers p(c | x_t, t) for guided generation: a small transformer on the latents of a frozen text
diffusion model, trained on x_t ~ q(x_t | x0) with x0 ~ q(x0 | w) and t drawn as in training.

Tasks (their labels):
- content: for each meaning-representation field (E2E's `mr`, or the embedded grammar's meanings), its value
  or "none", read from the mean of the encoder's states;
- pos: the tag of every position (START, END and PAD have classes of their own, so a tag sequence fixes the
  length too);
- syntax: a label for every span (i, j) of positions: the head's tag when the words form a head's subtree in
  the dependency parse (tagging.subtree_spans), else "none".

What the classifier reads (classifier.reads): `x_t`, the noisy latent itself (Diffusion-LM), or `x0`, the frozen
model's estimate x0_hat(x_t, t) as its sampler makes it (model_x0); guidance then takes the gradient of
log p(c | x0_hat(x_t, t), t) through the denoiser, as the token constraints do. The denoiser has already done
most of the work of reading a noisy latent, so a small classifier on its estimate is more accurate at every
noise level (measured in docs/benchmarks.md), at the cost of the model's forward passes in training and a
backward pass through it in guidance.

The classifier records a fingerprint of the diffusion model it was trained for (its embedding, schedule and
length): it only makes sense on that model's latents.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .card import CardedRun, warn_if_unfinished
from .config import Config, save_config
from .curves import require_tensorboard
from .data import mr_values, parse_mr, special_ids
from .engines import TorchEngine
from .files import check_out_dir, start_out_dir
from .errors import DifflmError, check_choice, loading
from .modeling import TimeEmbedding, build_encoder, model_type, register_auto_classes
from .tagging import POS_TAGS
from .text import SamplingModelFn, embed_with_noise
from .runtime import resolve_device
from .train import BatchStream, prepare_data, run_loop

log = logging.getLogger("difflm")
TASKS = ("content", "pos", "syntax")
POSITION_CLASSES = ("[START]", "[END]", "[PAD]") + POS_TAGS  # pos: a class per position
SPAN_CLASSES = ("none",) + POS_TAGS  # syntax: a class per span
IGNORE = -100


def model_fingerprint(model) -> str:
    """What ties a classifier to one diffusion model: its embedding table, schedule and sequence length."""
    c = model.config
    h = hashlib.sha256(model.embedding.weight.detach().float().cpu().numpy().tobytes())
    h.update(f"{c.schedule}|{c.num_steps}|{c.seq_len}|{c.embed_dim}".encode())
    return h.hexdigest()[:16]


class NoisyClassifierConfig(PretrainedConfig):
    model_type = "difflm-classifier"

    def __init__(self, task: str = "content", fields: Optional[Dict[str, List[str]]] = None, seq_len: int = 64,
                 embed_dim: int = 16, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                 dropout: float = 0.1, span_dim: int = 64, diffusion_fingerprint: str = "", reads: str = "x_t",
                 **kwargs):
        self.task, self.fields = task, dict(fields or {})
        self.seq_len, self.embed_dim, self.hidden_size = seq_len, embed_dim, hidden_size
        self.num_layers, self.num_heads, self.dropout, self.span_dim = num_layers, num_heads, dropout, span_dim
        self.diffusion_fingerprint, self.reads = diffusion_fingerprint, reads
        super().__init__(**kwargs)

    def field_offsets(self) -> Dict[str, int]:
        """content: where each field's logits start; a field has 1 + len(values) classes (0 = none)."""
        out, k = {}, 0
        for name, values in self.fields.items():
            out[name], k = k, k + 1 + len(values)
        return out

    @property
    def num_outputs(self) -> int:
        if self.task == "content":
            return sum(1 + len(v) for v in self.fields.values())
        return len(POSITION_CLASSES) if self.task == "pos" else len(SPAN_CLASSES)


class NoisyClassifier(PreTrainedModel):
    config_class = NoisyClassifierConfig
    base_model_prefix = "difflm_classifier"
    _supports_sdpa = True

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__(config)
        h = config.hidden_size
        self.input_proj = nn.Linear(config.embed_dim, h)
        self.time_embed = TimeEmbedding(h)
        self.encoder = build_encoder("bert", h, config.num_layers, config.num_heads, 4 * h, config.dropout,
                                     config.seq_len)
        if config.task == "syntax":
            self.left, self.right = nn.Linear(h, config.span_dim), nn.Linear(h, config.span_dim)
            self.head = nn.Sequential(nn.GELU(), nn.Linear(config.span_dim, config.num_outputs))
        else:
            self.head = nn.Linear(h, config.num_outputs)
        self.post_init()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits: content (B, outputs), pos (B, L, classes), syntax (B, L, L, classes) for spans (i, j)."""
        temb = self.time_embed.embed(t)  # (B, H), in the weights' dtype
        h = self.encoder(inputs_embeds=self.input_proj(x_t.to(temb.dtype)) + temb[:, None, :]).last_hidden_state
        if self.config.task == "content":
            return self.head(h.mean(dim=1))
        if self.config.task == "pos":
            return self.head(h)
        return self.head(self.left(h)[:, :, None, :] + self.right(h)[:, None, :, :])

    def log_probs(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-probabilities per class group: content (B, outputs) normalised within each field, else per
        position / span."""
        logits = self(x_t, t).float()
        if self.config.task != "content":
            return logits.log_softmax(-1)
        parts, offsets = [], list(self.config.field_offsets().values()) + [logits.shape[-1]]
        for a, b in zip(offsets, offsets[1:]):
            parts.append(logits[:, a:b].log_softmax(-1))
        return torch.cat(parts, dim=-1)


register_auto_classes(NoisyClassifierConfig, NoisyClassifier)


@torch.no_grad()
def model_x0(model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The diffusion model's x0 estimate at (x_t, t) as its sampler makes it (SamplingModelFn: the model's sampling
    temperature; with self-conditioning, fed its own first estimate at the same x_t): what a classifier with
    reads=x0 is trained on and, in guidance, reads through the sampler's x0 estimate."""
    fn = SamplingModelFn(model)
    if model.config.self_condition:
        fn(x_t, t)
    return fn.x0(x_t, t)


# ---- labels ------------------------------------------------------------------------------------------------------
def content_labels(mrs: List[str], fields: Dict[str, List[str]]) -> torch.Tensor:
    """(N, fields) class indices: 0 when the field is absent (or its value unknown), else 1 + the value's index."""
    index = {f: {v: i + 1 for i, v in enumerate(vals)} for f, vals in fields.items()}
    rows = [[index[f].get(parse_mr(mr).get(f), 0) for f in fields] for mr in mrs]
    return torch.tensor(rows, dtype=torch.long)


def words_of(ids: torch.Tensor, tokenizer) -> List[List[str]]:
    """The tokens between START and the first END of each row, as strings (what the tagger reads)."""
    start, end, pad = special_ids(tokenizer)
    out = []
    for row in ids.tolist():
        body = row[1:]
        body = body[: body.index(end)] if end in body else body
        out.append(tokenizer.convert_ids_to_tokens([i for i in body if i not in (pad, start)]))
    return out


def position_labels(tags: List[List[str]], seq_len: int) -> torch.Tensor:
    """(N, L) pos classes: START, the tags, END, then PAD (tags beyond L - 2 dropped, as the text was)."""
    cls = {c: i for i, c in enumerate(POSITION_CLASSES)}
    out = torch.full((len(tags), seq_len), cls["[PAD]"], dtype=torch.long)
    out[:, 0] = cls["[START]"]
    for r, row in enumerate(tags):
        row = row[: seq_len - 2]
        out[r, 1: len(row) + 1] = torch.tensor([cls[t] for t in row], dtype=torch.long)
        out[r, len(row) + 1] = cls["[END]"]
    return out


def span_labels(spans: List[set], lengths: List[int], seq_len: int) -> torch.Tensor:
    """(N, L, L) syntax classes over positions: gold subtree spans their head's tag, other spans of two or more
    words "none", single words, spans outside the words and j < i ignored. Word k sits at position k + 1 (after START)."""
    cls = {c: i for i, c in enumerate(SPAN_CLASSES)}
    out = torch.full((len(spans), seq_len, seq_len), IGNORE, dtype=torch.long)
    for r, (row, n) in enumerate(zip(spans, lengths)):
        n = min(n, seq_len - 2)
        out[r, 1: n + 1, 1: n + 1] = torch.triu(torch.full((n, n), cls["none"], dtype=torch.long), 1) + torch.tril(
            torch.full((n, n), IGNORE, dtype=torch.long))
        for i, j, tag in row:
            if j < n:
                out[r, i + 1, j + 1] = cls[tag]
    return out


@dataclass
class LabelledData:
    ids: torch.Tensor  # (N, L)
    labels: torch.Tensor  # content (N, F); pos (N, L); syntax (N, L, L)


def task_labels(task: str, ids: torch.Tensor, mrs: Optional[List[str]], tokenizer, fields=None) -> LabelledData:
    if task == "content":
        return LabelledData(ids, content_labels(mrs, fields))
    from .tagging import parse, pos_tags, subtree_spans

    words = words_of(ids, tokenizer)
    docs = parse(words)
    if task == "pos":
        return LabelledData(ids, position_labels([pos_tags(d) for d in docs], ids.shape[1]))
    return LabelledData(ids, span_labels([subtree_spans(d) for d in docs], [len(w) for w in words], ids.shape[1]))


def classifier_loss(clf: NoisyClassifier, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    """(mean cross-entropy, accuracy) over the labelled classes of a batch (syntax: accuracy on the subtree
    spans)."""
    logp = clf.log_probs(x_t, t)
    if clf.config.task == "content":
        offsets = list(clf.config.field_offsets().values())
        picked = torch.stack([logp[:, o:][torch.arange(len(labels)), labels[:, k]] for k, o in enumerate(offsets)], 1)
        groups = [logp[:, a:b] for a, b in zip(offsets, offsets[1:] + [logp.shape[1]])]
        correct = torch.stack([g.argmax(-1) == labels[:, k] for k, g in enumerate(groups)], 1)
        return -picked.mean(), correct.float().mean()
    mask = labels != IGNORE
    if clf.config.task == "syntax":  # most spans are "none": weigh the subtree spans and the rest equally
        gold, rest = labels > 0, labels == 0
        nll = 0.5 * (F.nll_loss(logp[gold], labels[gold]) + F.nll_loss(logp[rest], labels[rest]))
        return nll, (logp[gold].argmax(-1) == labels[gold]).float().mean()
    nll = F.nll_loss(logp[mask], labels[mask])
    return nll, (logp[mask].argmax(-1) == labels[mask]).float().mean()


# ---- training ----------------------------------------------------------------------------------------------------
def train_classifier(model, tokenizer, cfg: Config, task: str, show_progress: bool = True,
                     overwrite: bool = False) -> Path:
    """Train a noisy classifier for `task` on cfg.data with the frozen diffusion `model`; returns its directory."""
    check_choice("classifier task", task, TASKS)
    c = cfg.classifier
    out = Path(c.out_dir or f"runs/classifier-{task}")
    check_out_dir(out, "classifier.out_dir", overwrite=overwrite)
    require_tensorboard(c, "classifier")
    if cfg.data.seq_len != model.config.seq_len:
        raise DifflmError(f"data.seq_len={cfg.data.seq_len} differs from the model's {model.config.seq_len}")
    torch.manual_seed(c.seed)
    device = resolve_device(c.device)
    model = model.to(device).eval().requires_grad_(False)
    from .data import load_texts

    texts = load_texts(cfg.data)
    if task == "content":
        texts.require_meanings("content control")
    _, train_ids, dev_ids, counts = prepare_data(cfg, tokenizer, texts)
    n = min(len(train_ids), c.max_examples) if c.max_examples else len(train_ids)
    fields = mr_values(texts.train_mr[:n]) if task == "content" else {}
    log.info("labelling %d train and %d dev texts for %s", n, min(len(dev_ids), 1024), task)
    train = task_labels(task, train_ids[:n], texts.train_mr[:n] if texts.train_mr else None, tokenizer, fields)
    dev = task_labels(task, dev_ids[:1024], texts.dev_mr[:1024] if texts.dev_mr else None, tokenizer, fields)
    ccfg = NoisyClassifierConfig(task=task, fields=fields, seq_len=model.config.seq_len,
                                 embed_dim=model.config.embed_dim, hidden_size=c.hidden_size,
                                 num_layers=c.num_layers, num_heads=c.num_heads, dropout=c.dropout,
                                 diffusion_fingerprint=model_fingerprint(model), reads=c.reads)
    clf = NoisyClassifier(ccfg).to(device).train()
    log.info("classifier (%s): %d x %d, %.2fM parameters, %d classes", task, c.num_layers, c.hidden_size,
             sum(p.numel() for p in clf.parameters()) / 1e6, ccfg.num_outputs)
    engine = TorchEngine(clf, c)
    start_out_dir(out, overwrite=overwrite)
    save_config(cfg, out / "config.yaml")
    rows = BatchStream(torch.arange(len(train.ids))[:, None], c.batch_size, c.seed)
    g = torch.Generator(device=device).manual_seed(c.seed)

    def noisy(ids, generator):
        d = model.diffusion
        x0 = embed_with_noise(model, ids, generator).x0
        t = d.sample_t(len(ids), device, generator=generator)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=generator, device=device))
        return (model_x0(model, x_t, t) if c.reads == "x0" else x_t), t

    def next_loss():
        idx = next(rows)[:, 0]
        ids, labels = train.ids[idx].to(device), train.labels[idx].to(device)
        x_t, t = noisy(ids, g)
        loss, acc = classifier_loss(clf, x_t, t, labels)
        return loss, {"accuracy": acc.detach()}

    @torch.no_grad()
    def evaluate():
        clf.eval()
        eg = torch.Generator(device=device).manual_seed(0)
        losses, accs = [], []
        for i in range(0, len(dev.ids), c.batch_size):
            ids, labels = dev.ids[i: i + c.batch_size].to(device), dev.labels[i: i + c.batch_size].to(device)
            x_t, t = noisy(ids, eg)
            loss, acc = classifier_loss(clf, x_t, t, labels)
            losses.append(loss.item())
            accs.append(acc.item())
        clf.train()
        return {"dev_loss": sum(losses) / len(losses), "dev_accuracy": sum(accs) / len(accs)}

    counts.update(labelled_train=len(train.ids), labelled_dev=len(dev.ids))
    run = CardedRun("classifier", clf, tokenizer, cfg, counts, c, device, out, evaluate)

    result = run_loop(engine, next_loss, run.evaluate, run.save, c, out / "metrics.jsonl",
                      show_progress=show_progress, desc=f"classifier-{task}",
                      saved=f"the classifier so far saved in {out / 'model'}")
    ev = result.last_eval
    log.info("classifier trained %d steps in %.1f min; dev loss %.4f, accuracy %.3f (t drawn as in training); "
             "saved to %s", result.steps, result.minutes, ev.get("dev_loss", math.nan),
             ev.get("dev_accuracy", math.nan), out / "model")
    return out / "model"


def load_classifier(path: str, model=None, device="cpu") -> NoisyClassifier:
    """A classifier directory from `difflm train-classifier`; with `model`, check it was trained for it."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        p = p / "model"
    if model_type(p) != NoisyClassifierConfig.model_type:
        raise DifflmError(f"{path} is not a classifier directory; train one with `difflm train-classifier`")
    with loading(path, "classifier"):
        clf = NoisyClassifier.from_pretrained(p, local_files_only=True).to(device).eval().requires_grad_(False)
    warn_if_unfinished(p)
    if model is not None and clf.config.diffusion_fingerprint != model_fingerprint(model):
        raise DifflmError(f"classifier {path} was trained for another diffusion model (its embeddings or schedule "
                          f"differ); train one for this model with `difflm train-classifier --model`")
    return clf
