"""Controllable generation: Diffusion-LM's control suite as targets, guides, fixed tokens and success measures.

Tasks and their targets (the `--target` strings of `difflm control`):
- content  `field=value[,field=value]`  a noisy content classifier (or the model's own attributes with
           classifier-free guidance); success: every value appears in the text;
- length   `N`                          N tokens before END; scored by the model's rounding head on its x0
           estimate (no classifier); success: exactly N;
- infill   words with `_` for free slots  the given words fixed at their positions (the template fixes the
           length); success: all of them kept;
- pos      a tag per word (spaCy's tag set) a noisy tagger; success: word-level exact match;
- syntax   `i-j:TAG ...`                 word spans i..j (0-based, inclusive) that must be a head's subtree in the
           dependency parse, labelled with the head's tag; a noisy span classifier; success: span recall.
Several tasks at once guide together (their objectives add up). A pos or syntax target also implies a length
(a tag per word; spans need at least as many words as their last end), which with guidance.implied_length is
guided as a token constraint beside the classifier: the classifiers alone, scoring noisy latents, barely move
the length, so spans past the end of a short sample could not be met.

Length and infilling are constraints on tokens at positions: log p(token at k in allowed set | x_t) under the
rounding head applied to the model's x0 estimate. With guidance.impute the fixed tokens (and START, END, PAD)
are also written into every x0 estimate and the output tokens (so success at fixed positions is by
construction; the teacher LM's score of the whole text is what judges infilling).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .config import GuidanceConfig
from .data import parse_mr, special_ids
from .errors import DifflmError, check_choice
from .guidance import Guidance
from .sampling import Sampler
from .rounding import rounding_logits
from .text import BatchControl, Sample, SamplingModelFn, generate

log = logging.getLogger("difflm")
TASKS = ("content", "length", "infill", "pos", "syntax")
CLASSIFIED = ("content", "pos", "syntax")  # tasks guided by a noisy classifier
IMPLYING_LENGTH = ("pos", "syntax")  # targets that imply a length (guidance.implied_length)
FREE = "_"  # a free slot in an infilling template


@dataclass
class Target:
    task: str
    spec: str  # as written
    value: Any  # content {field: value}; length int; infill [word or None]; pos [tag]; syntax [(i, j, tag)]


@dataclass
class ControlContext:
    model: Any
    tokenizer: Any
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    classifiers: Dict[str, Any] = field(default_factory=dict)  # task -> NoisyClassifier
    free: bool = False  # content by classifier-free guidance (a model trained with model.attributes)
    temperature: Optional[float] = None  # sampling temperature (model.output=logits); None: the model's default

    @property
    def body_len(self) -> int:
        return self.model.config.seq_len - 2

    def classifier(self, task: str):
        if task not in self.classifiers:
            raise DifflmError(f"task {task} needs a noisy classifier: train one with `difflm train-classifier "
                              f"--model MODEL --task {task}` and pass it with --classifier DIR")
        return self.classifiers[task]

    def content_fields(self) -> Dict[str, List[str]]:
        if self.free:
            if not self.model.config.attributes:
                raise DifflmError("classifier-free content control needs a model trained with model.attributes=true")
            fields: Dict[str, List[str]] = {}
            for a in self.model.config.attributes:
                f, v = a.split("=", 1)
                fields.setdefault(f, []).append(v)
            return fields
        return self.classifier("content").config.fields


# ---- targets -----------------------------------------------------------------------------------------------------
def parse_target(task: str, spec: str, ctx: ControlContext) -> Target:
    """A target from its `--target` string, or a one-line error saying what is wrong and what is valid."""
    check_choice("task", task, TASKS)
    spec = spec.strip()
    n_max = ctx.body_len
    if task == "content":
        fields, wanted = ctx.content_fields(), {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise DifflmError(f"content target {item!r} must look like field=value (e.g. food=Italian)")
            f, v = (s.strip() for s in item.split("=", 1))
            if f not in fields:
                raise DifflmError(f"unknown field {f!r}; valid fields: {', '.join(fields)}")
            if v not in fields[f]:
                raise DifflmError(f"unknown value {v!r} for {f}; valid values: {', '.join(fields[f])}")
            wanted[f] = v
        if not wanted:
            raise DifflmError("content target is empty; give field=value, e.g. food=Italian")
        return Target(task, spec, wanted)
    if task == "length":
        try:
            n = int(spec)
        except ValueError:
            raise DifflmError(f"length target must be a whole number of tokens, got {spec!r}") from None
        if not 1 <= n <= n_max:
            raise DifflmError(f"target length {n} does not fit: the model's sequences hold 1 to {n_max} tokens "
                              f"(length {ctx.model.config.seq_len} with START and END)")
        return Target(task, spec, n)
    if task == "infill":
        words = spec.split()
        if len(words) > n_max:
            raise DifflmError(f"infilling template has {len(words)} tokens; the model holds at most {n_max}")
        if FREE not in words:
            raise DifflmError(f"infilling template has no free position; mark the slots to fill with {FREE}")
        vocab = ctx.tokenizer.get_vocab()
        unknown = [w for w in words if w != FREE and w not in vocab]
        if unknown:
            raise DifflmError(f"template word {unknown[0]!r} is not in the model's vocabulary")
        return Target(task, spec, [None if w == FREE else w for w in words])
    if task == "pos":
        from .tagging import check_tags

        tags = spec.split()
        check_tags(tags)
        if not 1 <= len(tags) <= n_max:
            raise DifflmError(f"a tag sequence needs 1 to {n_max} tags for this model, got {len(tags)}")
        return Target(task, spec, tags)
    return Target(task, spec, _parse_spans(spec, n_max))


def _parse_spans(spec: str, n_max: int) -> list:
    from .tagging import check_tags

    spans = []
    for item in spec.split():
        try:
            ij, tag = item.split(":")
            i, j = (int(v) for v in ij.split("-"))
        except ValueError:
            raise DifflmError(f"syntax span {item!r} must look like i-j:TAG (word positions, e.g. 0-2:NOUN)") from None
        check_tags([tag])
        if not 0 <= i < j < n_max:
            raise DifflmError(f"syntax span {item!r} must have 0 <= i < j < {n_max} (the model's longest text)")
        spans.append((i, j, tag))
    if not spans:
        raise DifflmError("syntax target is empty; give spans like 0-2:NOUN")
    return spans


# ---- guides ------------------------------------------------------------------------------------------------------
class ClassifierGuide:
    """log p(c | x_t) from a noisy classifier: a sum of the log-probabilities at flat indices into its output. A
    classifier of reads=x0 scores the model's x0 estimate x0_hat(x_t, t) (`x0_fn`), its gradient taken through the
    denoiser."""

    def __init__(self, classifier, index: torch.Tensor, mask: torch.Tensor, x0_fn: Optional[Callable] = None):
        self.classifier, self.index, self.mask = classifier, index, mask
        self.x0_fn = x0_fn if classifier.config.reads == "x0" else None

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = self.classifier.log_probs(x if self.x0_fn is None else self.x0_fn(x, t), t).flatten(1)
        return (logp.gather(1, self.index.clamp(min=0)) * self.mask).sum(1)


class TokenGuide:
    """log p(tokens at positions in their allowed sets | x_t): the rounding head on the model's x0 estimate."""

    def __init__(self, x0_fn: Callable, embedding: torch.Tensor, allowed: torch.Tensor, constrained: torch.Tensor):
        self.x0_fn, self.embedding, self.allowed, self.constrained = x0_fn, embedding, allowed, constrained

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = rounding_logits(self.x0_fn(x, t), self.embedding).float()  # (B, L, V)
        ok = logits.masked_fill(~self.allowed, float("-inf")).logsumexp(-1)
        return ((ok - logits.logsumexp(-1)) * self.constrained).sum(1)


class SharedEstimate:
    """An x0 estimate remembering its last (x, t): the guides of one guided objective read the same tensors, so the
    denoiser runs once for all of them (their gradients flow through the one graph)."""

    def __init__(self, x0_fn: Callable):
        self.x0_fn, self.last = x0_fn, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.last is None or self.last[0] is not x or self.last[1] is not t:
            self.last = (x, t, self.x0_fn(x, t))
        return self.last[2]


def classifier_index(target: Target, clf, seq_len: int) -> List[int]:
    """Flat indices into the classifier's (log-probability) output that the target asks for."""
    from .classifier import POSITION_CLASSES, SPAN_CLASSES

    c = clf.config
    if target.task == "content":
        offsets = c.field_offsets()
        return [offsets[f] + 1 + c.fields[f].index(v) for f, v in target.value.items()]
    if target.task == "pos":
        cls = {k: i for i, k in enumerate(POSITION_CLASSES)}
        tags = target.value[: seq_len - 2]
        row = ["[START]", *tags, "[END]"] + ["[PAD]"] * (seq_len - len(tags) - 2)
        return [p * len(POSITION_CLASSES) + cls[k] for p, k in enumerate(row)]
    cls = {k: i for i, k in enumerate(SPAN_CLASSES)}
    return [((i + 1) * seq_len + (j + 1)) * len(SPAN_CLASSES) + cls[tag] for i, j, tag in target.value]


def token_constraints(target: Target, ctx: ControlContext):
    """(fixed ids (L,) with -1 where free, allowed (L, V), constrained (L,)) of a length or infilling target:
    START, the words, END, PAD; free word slots may take any token but the special ones. Also the length a pos or
    syntax target implies (guidance.implied_length): a tag per word fixes it exactly; spans i..j need at least
    max(j) + 1 words, so the words up to the last span's end are constrained and the positions after are free."""
    L, V = ctx.model.config.seq_len, ctx.model.config.vocab_size
    start, end, pad = special_ids(ctx.tokenizer)
    open_end = target.task == "syntax"
    if target.task == "length":
        words = [None] * target.value
    elif target.task == "pos":
        words = [None] * len(target.value)
    elif target.task == "syntax":
        words = [None] * (max(j for _, j, _ in target.value) + 1)
    else:
        words = target.value
    ids = ctx.tokenizer.convert_tokens_to_ids([w for w in words if w is not None])
    fixed = torch.full((L,), -1, dtype=torch.long)
    fixed[0] = start
    if not open_end:
        fixed[len(words) + 1], fixed[len(words) + 2:] = end, pad
    it = iter(ids)
    for k, w in enumerate(words):
        if w is not None:
            fixed[k + 1] = next(it)
    allowed = torch.zeros(L, V, dtype=torch.bool)
    allowed[fixed >= 0, fixed[fixed >= 0]] = True
    free = fixed < 0
    allowed[free] = True
    allowed[free, start] = allowed[free, end] = allowed[free, pad] = False
    constrained = torch.ones(L, dtype=torch.bool)
    if open_end:
        allowed[len(words) + 1:] = True
        constrained[len(words) + 1:] = False
    return fixed, allowed, constrained


def attribute_vector(target: Target, names: List[str]) -> torch.Tensor:
    vec = torch.zeros(len(names))
    for f, v in target.value.items():
        vec[names.index(f"{f}={v}")] = 1.0
    return vec


def make_control(targets: Dict[str, List[Target]], ctx: ControlContext):
    """The `control` callback of text.generate for per-sample targets ({task: one Target per sample})."""
    model, g = ctx.model, ctx.guidance
    weight = model.embedding.weight
    device, L = weight.device, model.config.seq_len

    def control(a: int, b: int, model_fn: SamplingModelFn) -> BatchControl:
        guides, fixed, lengths = [], None, None
        free = ctx.free and "content" in targets
        if free:  # classifier-free guidance changes the model_fn, whose x0 estimate the token guides then read
            attrs = [attribute_vector(r, model.config.attributes) for r in targets["content"][a:b]]
            model_fn = SamplingModelFn(model, torch.stack(attrs).to(device), g.free_weight, net=model_fn.net,
                                       temperature=model_fn.temperature)
        x0 = SharedEstimate(model_fn.x0)
        for task, rows in targets.items():
            rows = rows[a:b]
            if task == "content" and free:
                continue
            if task in CLASSIFIED:
                clf = ctx.classifier(task)
                idx = [classifier_index(r, clf, L) for r in rows]
                k = max(len(i) for i in idx)
                index = torch.tensor([i + [-1] * (k - len(i)) for i in idx], device=device)
                guides.append((ClassifierGuide(clf, index, (index >= 0).to(weight.dtype), x0), g.classifier_weight))
            if task not in CLASSIFIED or (task in IMPLYING_LENGTH and g.implied_length):
                parts = [token_constraints(r, ctx) for r in rows]
                f, allowed, constrained = (torch.stack(p).to(device) for p in zip(*parts))
                fixed = f if fixed is None else torch.where(f >= 0, f, fixed)
                guides.append((TokenGuide(x0, weight, allowed, constrained), g.constraint_weight))
                lengths = _length_range(f, constrained, ctx, lengths)
        guide = Guidance(model.diffusion, guides, g) if guides else None
        if fixed is None or not g.impute:
            return BatchControl(model_fn=model_fn, guide=guide, lengths=lengths)
        return BatchControl(model_fn=model_fn, guide=guide, denoise_fn=_imputer(fixed, weight), fixed=fixed,
                            lengths=lengths)

    return control


def _length_range(fixed: torch.Tensor, constrained: torch.Tensor, ctx: ControlContext,
                  within: Optional[tuple] = None) -> tuple:
    """(low, high) (B,) bounds on the non-PAD positions n of token constraints (token_constraints), for a model of
    config.explicit_length, which draws n before the words: n = p + 1 where END is fixed at p; at least the first
    unconstrained position + 1 where the end is open (it may hold END). Intersected with `within`."""
    _, end, _ = special_ids(ctx.tokenizer)
    L = fixed.shape[1]
    at_end = (fixed == end).float().argmax(1)
    has_end = (fixed == end).any(1)
    open_from = torch.where(constrained.all(1), L, (~constrained).float().argmax(1))
    low = torch.where(has_end, at_end + 1, (open_from + 1).clamp(max=L))
    high = torch.where(has_end, at_end + 1, torch.full_like(low, L))
    if within is not None:
        low, high = torch.maximum(low, within[0]), torch.minimum(high, within[1])
    return low, high


def _imputer(fixed: torch.Tensor, weight: torch.Tensor) -> Callable:
    mask = (fixed >= 0)[..., None]
    emb = weight[fixed.clamp(min=0)]

    def denoise_fn(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, emb.to(x0.dtype), x0)

    return denoise_fn


# ---- success -----------------------------------------------------------------------------------------------------
def success(target: Target, words: List[str], text: str, doc=None) -> float:
    """The task's success measure for one sample (1/0, or a share for pos and syntax)."""
    if target.task == "content":
        low = text.lower()
        return float(all(v.lower() in low for v in target.value.values()))
    if target.task == "length":
        return float(len(words) == target.value)
    if target.task == "infill":
        return float(len(words) >= len(target.value)
                     and all(w is None or words[k] == w for k, w in enumerate(target.value)))
    from .tagging import pos_tags, subtree_spans

    if target.task == "pos":
        tags = pos_tags(doc)
        hits = sum(a == b for a, b in zip(tags, target.value))
        return hits / max(len(tags), len(target.value))
    spans = subtree_spans(doc)
    return sum(s in spans for s in target.value) / len(target.value)


@dataclass
class ControlledSample:
    text: str
    ids: List[int]
    targets: Dict[str, str]
    success: Dict[str, float]

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": self.ids, "targets": self.targets, "success": self.success,
                "success_all": min(self.success.values()) if self.success else None}


def score(samples: Sequence[Sample], targets: Dict[str, List[Target]], tokenizer) -> List[ControlledSample]:
    from .classifier import words_of

    words = words_of(torch.tensor([s.ids for s in samples]), tokenizer)
    docs = None
    if any(t in targets for t in ("pos", "syntax")):
        from .tagging import parse

        docs = parse(words)
    out = []
    for k, s in enumerate(samples):
        ok = {task: success(rows[k], words[k], s.text, docs[k] if docs else None) for task, rows in targets.items()}
        out.append(ControlledSample(s.text, s.ids, {task: rows[k].spec for task, rows in targets.items()}, ok))
    return out


def guidance_sampler(g: GuidanceConfig) -> Sampler:
    """The sampler of guidance.sampler / grid / order / eta, refused in one line naming the section."""
    try:
        return Sampler(g.sampler, g.grid, g.order or None, g.eta or None)
    except DifflmError as e:
        raise DifflmError(f"guidance.sampler/grid/order/eta: {e}") from None


def controlled_generate(ctx: ControlContext, targets: Dict[str, List[Target]], seed: int = 0, batch_size: int = 64,
                        progress: Optional[Callable[[int], None]] = None) -> List[ControlledSample]:
    """One sample per entry of the target lists (all the same length), guided toward all of its targets."""
    n = len(next(iter(targets.values())))
    g = ctx.guidance
    samples = generate(ctx.model, ctx.tokenizer, n, steps=g.sampling_steps, sampler=guidance_sampler(g), seed=seed,
                       batch_size=batch_size, progress=progress, control=make_control(targets, ctx),
                       temperature=ctx.temperature)
    return score(samples, targets, ctx.tokenizer)


def _drawable_fields(ctx: ControlContext) -> Dict[str, List[str]]:
    """Content values every available guide knows: the classifier's and, for a conditional model, its own."""
    sources = []
    if "content" in ctx.classifiers:
        sources.append(ctx.classifiers["content"].config.fields)
    if ctx.model.config.attributes:
        sources.append(replace(ctx, free=True).content_fields())
    if not sources:
        ctx.content_fields()  # raises the error naming what is missing
    return {f: [v for v in vals if all(v in s.get(f, []) for s in sources)] for f, vals in sources[0].items()}


# ---- evaluation: targets drawn from held-out text ----------------------------------------------------------------
def draw_targets(task: str, count: int, words: List[List[str]], mrs: Optional[List[str]], docs, ctx: ControlContext,
                 rng: random.Random) -> List[Target]:
    """`count` targets for `task` taken from held-out texts (their words, meaning representations, parses), as
    Diffusion-LM draws its control targets from held-out data."""
    out, order = [], list(range(len(words)))
    rng.shuffle(order)
    fields = _drawable_fields(ctx) if task == "content" else None
    for k in order:
        w = words[k]
        if not 1 <= len(w) <= ctx.body_len:
            continue
        if task == "content":
            known = [(f, v) for f, v in parse_mr(mrs[k]).items() if v in fields.get(f, [])]
            if not known:
                continue
            f, v = rng.choice(known)
            out.append(Target(task, f"{f}={v}", {f: v}))  # valid for every content guide at hand
            if len(out) == count:
                return out
            continue
        elif task == "length":
            spec = str(len(w))
        elif task == "infill":
            if len(w) < 5:
                continue
            left, right = len(w) // 3, len(w) - len(w) // 3  # keep the outer thirds, fill the middle
            spec = " ".join(x if (i < left or i >= right) else FREE for i, x in enumerate(w))
        elif task == "pos":
            from .tagging import pos_tags

            spec = " ".join(pos_tags(docs[k]))
        else:
            from .tagging import subtree_spans

            spans = sorted(subtree_spans(docs[k]))
            if not spans:
                continue
            i, j, tag = rng.choice(spans)
            spec = f"{i}-{j}:{tag}"
        try:
            out.append(parse_target(task, spec, ctx))
        except DifflmError:  # a held-out word outside the vocabulary (UNK) and the like
            continue
        if len(out) == count:
            return out
    raise DifflmError(f"only {len(out)} of {count} held-out texts give a {task} target; lower --num-targets")


@dataclass
class ControlRow:
    name: str  # task(s), or "unguided"
    success: Dict[str, float]  # mean success per task
    lm_score: float
    samples: int

    def to_dict(self) -> dict:
        return {"name": self.name, "success": self.success, "lm_score": self.lm_score, "samples": self.samples}


def eval_control(ctx: ControlContext, task_sets: List[List[str]], held_out, teacher, num_targets: int,
                 per_target: int, seed: int = 0, batch_size: int = 64, progress=None):
    """Diffusion-LM's control table: for each set of tasks, `num_targets` targets drawn from `held_out`
    (words, meaning representations) with `per_target` guided samples each: success and lm-score; the
    unguided row scores unguided samples against every task's targets. A task set ["content-free"] is content
    by classifier-free guidance (a model trained with model.attributes). Returns (rows, samples per row)."""
    from .teacher import lm_score

    words, mrs = held_out
    docs = None
    tasks = sorted({t.replace("content-free", "content") for s in task_sets for t in s})
    if any(t in ("pos", "syntax") for t in tasks):
        from .tagging import parse

        docs = parse(words)
    rng = random.Random(seed)
    drawn = {t: draw_targets(t, num_targets, words, mrs, docs, ctx, rng) for t in tasks}
    n = num_targets * per_target
    expand = {t: [rows[k // per_target] for k in range(n)] for t, rows in drawn.items()}
    seq_len = ctx.model.config.seq_len
    g = ctx.guidance
    plain = generate(ctx.model, ctx.tokenizer, n, steps=g.sampling_steps, sampler=guidance_sampler(g), seed=seed,
                     batch_size=batch_size, progress=progress, temperature=ctx.temperature)
    results = [("unguided", score(plain, expand, ctx.tokenizer))]
    for task_set in task_sets:
        free = "content-free" in task_set
        targets = {t.replace("content-free", "content"): expand[t.replace("content-free", "content")]
                   for t in task_set}
        results.append(("+".join(task_set), controlled_generate(replace(ctx, free=free), targets, seed=seed,
                                                                batch_size=batch_size, progress=progress)))
    rows = []
    for name, samples in results:
        mean = {t: sum(s.success[t] for s in samples) / len(samples) for t in samples[0].success}
        if name != "unguided":
            mean["all"] = sum(min(s.success.values()) for s in samples) / len(samples)
        lm = lm_score(teacher, ctx.tokenizer, [s.text for s in samples], seq_len) if teacher is not None else None
        rows.append(ControlRow(name, mean, lm, len(samples)))
    return rows, dict(results)


def control_table(rows: List[ControlRow]) -> str:
    """A markdown table: success % of each task (the unguided row against every task's targets) and lm-score."""
    tasks = [t for t in TASKS if any(t in r.success for r in rows)]
    head = "| samples | " + " | ".join(f"{t} success %" for t in tasks) + " | all % | lm-score | n |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for r in rows:
        cells = [f"{100 * r.success[t]:.1f}" if t in r.success else "" for t in tasks]
        allp = f"{100 * r.success['all']:.1f}" if "all" in r.success else ""
        lm = f"{r.lm_score:.3f}" if r.lm_score is not None else "n/a"
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {allp} | {lm} | {r.samples} |")
    return "\n".join(lines) + "\n"
