"""Model cards: a README.md in every saved model directory, in the Hugging Face Hub's format.

The YAML metadata holds the Hub's keys (library_name, tags, datasets, license, pipeline_tag) and, under `difflm`,
the facts the library knows of the model: what it is, what it was trained on, how long, how it scored. The
markdown below is rendered from those facts. `difflm eval` and `difflm eval-control` add their figures as one
section each (`add_section`): the section between its markers is replaced, the rest of the card is kept as it
was, hand edits included. `difflm info` prints the facts (`read_card`).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import yaml

from .errors import DifflmError
from .files import atomic_write_text

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
KNOWN_LICENSES = {"tuetschek/e2e_nlg": "cc-by-sa-4.0", "ylecun/mnist": "mit", "uoft-cs/cifar10": "unknown"}
KINDS = {  # kind -> (title, pipeline tag, tags)
    "diffusion": ("Text diffusion model", "text-generation", ["diffusion", "text-diffusion", "diffusion-lm"]),
    "image-diffusion": ("Image diffusion model", "unconditional-image-generation", ["diffusion", "image"]),
    "teacher": ("Teacher language model (for lm-score)", "text-generation", ["gpt2", "lm-score-teacher"]),
    "classifier": ("Noisy classifier (for guided control)", "text-classification", ["diffusion-guidance"]),
}
EXTRA_HF_KEYS = {"torch_dtype", "use_cache", "tie_word_embeddings"}  # bookkeeping beside PretrainedConfig's own


def hub_dataset(source: str) -> Optional[str]:
    """The Hub id of a data source, or None for builtin data and local files."""
    if not source or source.startswith("builtin:") or Path(source).exists() or not HUB_ID.match(source):
        return None
    return source


def data_facts(cfg, counts: Dict[str, int]) -> dict:
    """What a model was trained on: the configured source and the split sizes `counts` (train, dev, truncated)."""
    d = cfg.data
    facts = {"source": d.source, "dev_source": d.dev_source or None, "modality": d.modality, **counts}
    if d.modality == "text":
        facts.update(text_column=d.text_column, seq_len=d.seq_len, min_freq=d.min_freq, lowercase=d.lowercase)
    return facts


def architecture(config) -> dict:
    """A Hugging Face config's own fields (the model's shape and options), without the library's bookkeeping."""
    from transformers import PretrainedConfig

    skip = set(PretrainedConfig().to_dict()) | EXTRA_HF_KEYS
    return {k: v for k, v in sorted(config.to_dict().items()) if k not in skip and not k.startswith("_")}


def summary(kind: str, a: dict) -> str:
    """One sentence on what a model is, from its architecture facts."""
    if kind == "diffusion":
        recipe = [f"output={a['output']}"] + ["pre-LN blocks"] * (a.get("denoiser", "bert") == "prenorm") \
            + ["normalised embeddings"] * bool(a.get("embedding_norm")) \
            + ["self-conditioning"] * bool(a.get("self_condition")) \
            + ([f"on {a['self_condition_rows']:g} of the rows"] if a.get("self_condition_rows") is not None else []) \
            + ["zero-initialised head"] * bool(a.get("zero_init_output")) \
            + [f"time warping ({a['time_warp_bins']} bins)"] * bool(a.get("time_warp_bins")) \
            + [f"noise scale {a['noise_scale']:g}"] * (a.get("noise_scale", 1) != 1) \
            + ([f"log_snr(0) floored at {a['log_snr_max_floor']:g}"] if a.get("log_snr_max_floor") is not None else []) \
            + ["network reads the log-SNR"] * (a.get("time_input", "t") == "log_snr") \
            + [f"sampled at temperature {a['sample_temperature']:g}"] * (a.get("sample_temperature", 1) != 1) \
            + [f"conditioned on {len(a['attributes'])} attributes"] * bool(a.get("attributes"))
        return (f"A {a['num_layers']} x {a['hidden_size']} transformer denoiser over {a['seq_len']} positions of "
                f"{a['embed_dim']}-dimensional word embeddings ({a['vocab_size']} words); {a['schedule']} "
                f"schedule, T={a['num_steps']}, predicts {a['prediction']}; {', '.join(recipe)}.")
    if kind == "image-diffusion":
        return (f"A U-Net ({a['base_channels']} channels x {a['channel_mults']}) on {a['channels']}x"
                f"{a['image_size']}x{a['image_size']} images; {a['schedule']} schedule, T={a['num_steps']}, "
                f"predicts {a['prediction']}.")
    if kind == "teacher":
        return (f"A GPT-2 of {a.get('n_layer')} layers x {a.get('n_embd')} over the diffusion model's vocabulary "
                f"({a.get('vocab_size')} words): the judge behind lm-score.")
    reads = "the model's x0 estimates" if a.get("reads") == "x0" else "noisy latents"
    return f"A {a.get('num_layers')} x {a.get('hidden_size')} classifier of {reads} for the {a.get('task')} task."


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_objective(arch: dict) -> str:
    """One line on what a diffusion model was trained to minimise (from its config)."""
    if "mse_weight" not in arch:
        return f"{arch.get('prediction', 'x0')}-prediction, squared error (L_simple)"
    parts = []
    if arch["mse_weight"]:
        parts.append(f"{arch['mse_weight']:g} x squared x0 error")
    if arch["ce_weight"]:
        parts.append(f"{arch['ce_weight']:g} x cross-entropy of the x0 logits")
    head = "x0 = softmax(logits) E" if arch.get("output") == "logits" else f"{arch['prediction']}-prediction"
    return f"{head}; loss = {' + '.join(parts)} + rounding + prior"


def new_card(kind: str, model, data: dict, training: dict, where: str = "PATH", extra: Optional[dict] = None) -> str:
    """The card of a model saved to `where` (text): Hub metadata, the facts under `difflm`, the body rendered."""
    if kind not in KINDS:
        raise ValueError(f"unknown card kind {kind!r}")
    arch = architecture(model.config)
    facts = {"kind": kind, "parameters": parameter_count(model), "architecture": arch, "data": data,
             "training": training, **(extra or {})}
    if kind in ("diffusion", "image-diffusion"):
        facts["objective"] = describe_objective(arch)
    title, pipeline, tags = KINDS[kind]
    meta = {"library_name": "difflm", "tags": ["difflm", *tags], "pipeline_tag": pipeline}
    hub = [s for s in (hub_dataset(data.get("source", "")), hub_dataset(data.get("dev_source") or "")) if s]
    if hub:
        meta["datasets"] = sorted(set(hub))
        licenses = {KNOWN_LICENSES[h] for h in hub if h in KNOWN_LICENSES}
        if len(licenses) == 1:
            meta["license"] = licenses.pop()
    meta["difflm"] = facts
    return _join(meta, _body(title, facts).replace("PATH", where))


def read_card(model_dir) -> Tuple[dict, str]:
    """(metadata, body) of a model directory's card; a one-line error where there is none."""
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise DifflmError(f"{model_dir} has no difflm model card ({CARD}); give a model directory saved by difflm "
                          f"train, train-teacher or train-classifier (models saved before cards existed have none)")
    text = path.read_text(encoding="utf-8")
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    meta = yaml.safe_load(m.group(1)) if m else None
    if not isinstance(meta, dict) or not isinstance(meta.get("difflm"), dict):
        raise DifflmError(f"{path} is not a difflm model card (no `difflm` facts in its YAML metadata); "
                          f"it was not written by difflm")
    return meta, m.group(2)


def warn_if_unfinished(model_dir) -> None:
    """Log a warning where the card of a model directory says its training stopped before train.max_steps: a
    run's `model/` is rewritten at every save_every, so a run still going (or stopped, or cut by
    train.max_minutes) leaves an intermediate model there that would otherwise be scored as the final one.
    Directories without a readable card (saved before cards existed) pass silently."""
    try:
        training = read_card(model_dir)[0]["difflm"].get("training") or {}
    except (DifflmError, OSError, yaml.YAMLError):
        return
    steps, max_steps = training.get("steps"), training.get("max_steps")
    if isinstance(steps, int) and isinstance(max_steps, int) and steps < max_steps:
        logging.getLogger("difflm").warning(
            "%s was saved at step %d of %d: its training is still running, was stopped, or hit train.max_minutes; "
            "the figures are of that intermediate model", model_dir, steps, max_steps)


def add_section(model_dir, name: str, title: str, figures: dict, command: str = "") -> None:
    """Put `figures` (a nested dict of numbers and strings) into the card as section `name`: into the metadata's
    facts, and as a table between the section's markers in the body (replaced if there, else appended).
    The rest of the card is kept; the file is replaced atomically."""
    meta, body = read_card(model_dir)
    meta["difflm"][name] = figures
    start, end = f"<!-- difflm:{name} -->", f"<!-- /difflm:{name} -->"
    block = f"{start}\n## {title}\n\n" + (f"`{command}`\n\n" if command else "") + _table(figures) + f"{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    body = pattern.sub(lambda _: block, body) if pattern.search(body) else body.rstrip("\n") + "\n\n" + block
    atomic_write_text(Path(model_dir) / CARD, _join(meta, body))


def _join(meta: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n") + "\n---\n" + body


def flatten(figures: dict, prefix: str = "") -> Dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are left out (too long for a card's table)."""
    out: Dict[str, object] = {}
    for k, v in figures.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not isinstance(v, (list, tuple)) and v is not None:
            out[key] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _table(figures: dict) -> str:
    rows = flatten(figures)
    return "| | |\n| --- | ---: |\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in rows.items()) + "\n"


def _body(title: str, facts: dict) -> str:
    arch, data, tr = facts["architecture"], facts["data"], facts["training"]
    lines = [f"# {title}", "", f"{summary(facts['kind'], arch)} {facts['parameters'] / 1e6:.2f}M parameters, "
             f"trained with difflm.", ""]
    if "objective" in facts:
        lines += [f"**Objective**: {facts['objective']}.", ""]
    lines += ["## What it is", "", _table(arch), "## Training data", "", _table(data),
              "## Training", "", _table(tr)]
    if facts["kind"] == "diffusion":
        lines += ["## Use", "", "```python", "from difflm.text import generate, load_model",
                  "model, tokenizer = load_model(\"PATH\")",
                  "print([s.text for s in generate(model, tokenizer, num_samples=4, steps=200)])", "```",
                  "", "or `difflm generate --model PATH --num-samples 4 --steps 200 --out samples.jsonl --show 4`.",
                  ""]
    elif facts["kind"] == "teacher":
        lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "teacher = AutoModelForCausalLM.from_pretrained(\"PATH\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```", "",
                  "or `difflm eval --model DIFFUSION_MODEL --teacher PATH` for lm-score.", ""]
    elif facts["kind"] == "classifier":
        lines += ["## Use", "", "`difflm control --model DIFFUSION_MODEL --classifier PATH --task "
                  f"{arch.get('task', 'TASK')} --target ... --num-samples 8 --out samples.jsonl`", ""]
    elif facts["kind"] == "image-diffusion":
        lines += ["## Use", "", "`difflm generate --model PATH --num-samples 16 --out samples.png`", ""]
    return "\n".join(lines) + "\n"


def device_name(device) -> str:
    """The device a run used, as a person names it: the GPU's model, or the CPU's and the torch threads."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({cpu_model()}, {threads} thread{'' if threads == 1 else 's'})"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the machine type."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def training_facts(loop, step: int, seconds: float, device, evaluation: dict, processes: int = 1) -> dict:
    """How long a run of LoopConfig `loop` trained: steps, examples seen, wall time, where, and the last
    evaluation's figures (`evaluation`: dev loss and the like)."""
    accum = getattr(loop, "grad_accum", 1)
    facts = {"steps": step, "max_steps": loop.max_steps, "batch_size": loop.batch_size, "grad_accum": accum,
             "processes": processes, "examples_seen": step * loop.batch_size * accum * processes,
             "wall_time_s": round(seconds, 1), "device": device_name(device), "lr": loop.lr,
             "warmup_steps": loop.warmup_steps}
    for key in ("engine", "precision", "zero_stage", "ema_decay"):
        if hasattr(loop, key):
            facts[key] = getattr(loop, key)
    if getattr(loop, "posterior_warmup_steps", 0):
        facts["posterior_warmup_steps"] = loop.posterior_warmup_steps
    facts.update({f"final_{k}": round(float(v), 6) for k, v in evaluation.items()})
    return facts


def format_card(meta: dict, model_dir: str = "") -> str:
    """The card's facts for a terminal: one `key: value` line each, grouped by section."""
    facts = meta["difflm"]
    title = KINDS.get(facts.get("kind"), (facts.get("kind", "model"),))[0]
    lines = [f"{title}: {model_dir}".rstrip(": "), f"  parameters: {facts.get('parameters', '?'):,}"]
    if "objective" in facts:
        lines.append(f"  objective: {facts['objective']}")
    for key in ("datasets", "license"):
        if key in meta:
            lines.append(f"  {key}: {meta[key]}")
    for section, value in facts.items():
        if isinstance(value, dict):
            lines.append(f"{section}:")
            lines += [f"  {k}: {_fmt(v)}" for k, v in flatten(value).items()]
    return "\n".join(lines) + "\n"


class CardedRun:
    """Saving for a trainer whose model directory is just the model (teacher, classifier): `save(step)` writes
    `<out>/model` with its card; `evaluate()` runs the trainer's evaluation and keeps it for the card."""

    def __init__(self, kind: str, model, tokenizer, cfg, counts: dict, loop, device, out: Path,
                 evaluate: Callable[[], dict]):
        self.kind, self.model, self.tokenizer, self.cfg, self.counts = kind, model, tokenizer, cfg, counts
        self.loop, self.device, self.out, self._evaluate = loop, device, Path(out), evaluate
        self.began, self.last = time.time(), {}

    def evaluate(self) -> dict:
        self.last.update(self._evaluate())
        return dict(self.last)

    def save(self, step: int) -> None:
        from .text import save_model

        card = new_card(self.kind, self.model, data_facts(self.cfg, self.counts),
                        training_facts(self.loop, step, time.time() - self.began, self.device, self.last),
                        where=str(self.out / "model"))
        save_model(self.model, self.tokenizer, self.out / "model", extra_files={CARD: card})
