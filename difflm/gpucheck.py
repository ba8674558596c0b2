"""The summary of `scripts/gpu-check.sh`: the figures the GPU run must show, read back from what its stages wrote
into one folder, beside their targets. Whatever a stage did not write is reported as missing, so a run cut short
still summarises what it measured.

    python -m difflm.gpucheck OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

from .curves import read_metrics

# (what, target, comparison): the targets of the GPU issue
TARGETS = {
    "training seq/s, difflm over recipe": (10.0, ">="),
    "training MFU, difflm": (0.45, ">="),
    "DeepSpeed ZeRO-2 step time over plain PyTorch": (1.10, "<="),
    "sampling seq/s at 200 steps, best difflm over recipe": (100.0, ">="),
    "E2E lm-score over the teacher's held-out perplexity": (1.5, "<="),
}


def _lines(path: Path) -> List[dict]:
    return read_metrics(path) if path.is_file() else []


def _last(rows: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def figures(out: Path) -> dict:
    """The headline figures from OUT (None where a stage wrote nothing)."""
    bench = _lines(out / "bench.jsonl")
    pick = {(r["section"], r.get("name")): r for r in bench}
    device = pick.get(("device", None), {}).get("device")
    ratio = pick.get(("training", "ratio"), {}).get("ratio")
    mfu = pick.get(("training", "difflm"), {}).get("mfu")
    zero2 = pick.get(("engines", "DeepSpeed ZeRO-2"), {}).get("ratio_to_plain")
    sampling = [r["ratio_to_recipe"] for r in bench if r["section"] == "sampling" and r["steps"] == 200]
    ev = out / "quality" / "eval" / "metrics.json"
    metrics = json.loads(ev.read_text())["metrics"] if ev.is_file() else {}
    lm = metrics.get("lm_score", {})
    div, ref = metrics.get("diversity", {}), metrics.get("diversity_held_out", {})
    train_rows = _lines(out / "quality" / "model" / "metrics.jsonl")
    teacher_rows = _lines(out / "quality" / "teacher" / "metrics.jsonl")
    quality = lm["samples"] / lm["held_out_text"] if lm.get("samples") and lm.get("held_out_text") else None
    return {
        "device": device,
        "training seq/s, difflm over recipe": ratio,
        "training MFU, difflm": mfu,
        "DeepSpeed ZeRO-2 step time over plain PyTorch": zero2,
        "sampling seq/s at 200 steps, best difflm over recipe": max(sampling) if sampling else None,
        "E2E lm-score over the teacher's held-out perplexity": quality,
        "lm-score of the samples": lm.get("samples"),
        "teacher perplexity on held-out text": lm.get("held_out_text"),
        "teacher dev perplexity (its training)": _last(teacher_rows, "dev_perplexity"),
        "unigram entropy, samples / held-out text": (div.get("unigram_entropy"), ref.get("unigram_entropy")),
        "distinct-2, samples / held-out text": (div.get("distinct_2"), ref.get("distinct_2")),
        "diffusion training steps reached": _last(train_rows, "step"),
        "diffusion training minutes": (_last(train_rows, "elapsed_s") or 0) / 60 or None,
        "teacher training steps reached": _last(teacher_rows, "step"),
        "stages": _lines(out / "stages.jsonl"),
    }


def _fmt(v) -> str:
    if v is None:
        return "missing"
    if isinstance(v, tuple):
        return " / ".join(_fmt(x) for x in v)
    return f"{v + 0.0:.4g}" if isinstance(v, float) else str(v)  # + 0.0: no "-0"


def summary(out: Path) -> str:
    f = figures(Path(out))
    lines = [f"# gpu-check of {out}", "", f"device: {f['device'] or 'missing'}", "",
             "| figure | value | target | met |", "| --- | ---: | ---: | --- |"]
    for name, value in f.items():
        if name in ("device", "stages"):
            continue
        if name in TARGETS:
            target, op = TARGETS[name]
            met = "" if value is None else ("yes" if (value >= target if op == ">=" else value <= target) else "no")
            lines.append(f"| {name} | {_fmt(value)} | {op} {target:g} | {met} |")
        else:
            lines.append(f"| {name} | {_fmt(value)} | | |")
    lines += ["", "| stage | exit | seconds | limit |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']} | {s['limit']} |" for s in f["stages"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python -m difflm.gpucheck OUT (the folder scripts/gpu-check.sh wrote)", file=sys.stderr)
        sys.exit(2)
    print(summary(Path(sys.argv[1])), end="")
