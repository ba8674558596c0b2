"""The evaluation report: metrics.json, report.md and PNG plots, written atomically into one directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import List

from .evaluation import Evaluation


def _plots(ev: Evaluation, out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if ev.curve is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.loglog(ev.curve.t, ev.curve.mse, marker=".")
        a.set(xlabel="t", ylabel="E||x0 - x0_hat||^2 per element", title="denoising error on held-out text")
        b.semilogx(ev.curve.t, ev.curve.nats_per_decade, marker=".", color="C1")
        shares = ", ".join(f"{k}: {v:.0%}" for k, v in ev.curve.share_by_decade.items())
        b.set(xlabel="t", ylabel="nats per sequence per decade of t",
              title="where the bound's diffusion nats are spent (area = nats)")
        b.text(0.02, 0.97, textwrap.fill(shares, 60), transform=b.transAxes, va="top", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "denoising.png", dpi=110)
        plt.close(fig)
        written.append("denoising.png")
    bounds = [(k.split("_", 1)[1], v) for k, v in ev.metrics.items() if k.startswith("bound_")]
    if bounds:
        names = list(bounds[0][1]["terms_per_sequence"])
        fig, ax = plt.subplots(figsize=(8, 3.6))
        width = 0.8 / len(bounds)
        for j, (label, rep) in enumerate(bounds):
            vals = [rep["terms_per_sequence"][n] * (-1 if n == "entropy" else 1) for n in names]
            ax.bar([i + j * width for i in range(len(names))], vals, width, label=label)
        ax.set_xticks([i + width * (len(bounds) - 1) / 2 for i in range(len(names))],
                      [n if n != "entropy" else "-entropy" for n in names])
        ax.axhline(0, color="k", lw=0.6)
        ax.set(ylabel="nats per sequence", title="terms of the bound on -log p(w) (they add up to it)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "elbo_terms.png", dpi=110)
        plt.close(fig)
        written.append("elbo_terms.png")
    if ev.trajectories:
        rows = len(ev.trajectories[0].t)
        fig, ax = plt.subplots(figsize=(12, 0.55 * rows * len(ev.trajectories) + 0.8))
        ax.axis("off")
        y = 1.0
        step = 1.0 / (rows * len(ev.trajectories) + len(ev.trajectories))
        for k, traj in enumerate(ev.trajectories):
            ax.text(0, y, f"sample {k + 1}", weight="bold", va="top", fontsize=9, transform=ax.transAxes)
            y -= step
            for t, text in zip(traj.t, traj.text):
                ax.text(0.0, y, f"t={t:.3f}", va="top", fontsize=8, family="monospace", transform=ax.transAxes)
                ax.text(0.09, y, textwrap.shorten(text or "(empty)", 150), va="top", fontsize=8,
                        family="monospace", transform=ax.transAxes)
                y -= step
        ax.set_title("denoising trajectories: the x0 estimate, decoded as the samples are, as sampling goes from t=1 to 0",
                     fontsize=10)
        fig.savefig(out / "trajectories.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append("trajectories.png")
    return written


def _fmt(est: dict) -> str:
    return f"{est['mean']:.3f} ± {est['se']:.3f}"


def markdown(ev: Evaluation, plots: List[str], command: str) -> str:
    m = ev.metrics
    lines = [f"# Evaluation of {ev.model}", "", f"Command: `{command}`", "",
             f"{ev.samples or 'No'} samples{'' if ev.samples else ' (no metric asked for them)'}; "
             f"{ev.held_out} held-out texts.", ""]
    for key in ("bound_discrete", "bound_continuous"):
        if key in m:
            r = m[key]
            lines += [f"## Likelihood bound ({r['time']} time)", "",
                      f"Over all {r['sequences']} held-out sequences, {r['draws_per_sequence']} stratified draws of t "
                      "each. Per token counts words and END (not START, not PAD); the bound itself covers every "
                      "position of the padded sequence.", "",
                      "| nats / sequence | nats / token | bits / token | perplexity bound | nats / position |",
                      "| ---: | ---: | ---: | ---: | ---: |",
                      f"| {_fmt(r['nats_per_sequence'])} | {_fmt(r['nats_per_token'])} | {_fmt(r['bits_per_token'])} "
                      f"| {r['perplexity_bound']:.4g} | {_fmt(r['nats_per_position'])} |", "",
                      "Terms (nats per sequence): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                              r["terms_per_sequence"].items()), ""]
            if r.get("gap_to_exact"):
                lines += [f"**Gap to the exact answer: {_fmt(r['gap_to_exact'])} nats per sentence** (the bound minus "
                          f"the true -log p of each held-out sentence, paired; their mean is "
                          f"{r['exact_nats_per_sequence']:.3f}, the grammar's entropy estimated on these sentences).",
                          ""]
            if r.get("minus_baseline_per_sequence"):
                lines += [f"**Minus the baseline {r['baseline']}: {_fmt(r['minus_baseline_per_sequence'])} nats per "
                          f"sequence, {_fmt(r['minus_baseline_per_token'])} per token** (its bound on the same "
                          "texts with the same draws, subtracted per text; below zero, this model's bound is "
                          "tighter).", ""]
    if "lm_score" in m:
        lines += ["## lm-score (teacher LM perplexity)", "", "| samples | held-out text (the floor) |",
                  "| ---: | ---: |", f"| {m['lm_score']['samples']:.3f} | {m['lm_score']['held_out_text']:.3f} |", ""]
    if "diversity" in m:
        lines += ["## Diversity", "", "Held-out text: as many texts as samples, since distinct-n and self-BLEU depend "
                  "on the count.", "", "| text | distinct-1 | distinct-2 | distinct-3 | self-BLEU | unigram entropy |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for label, key in (("samples", "diversity"), ("held-out", "diversity_held_out")):
            d = m[key]
            lines.append(f"| {label} | {d['distinct_1']:.3f} | {d['distinct_2']:.3f} | {d['distinct_3']:.3f} | "
                         f"{d['self_bleu']:.3f} | {d['unigram_entropy']:.3f} |")
        lines.append("")
    if "grammar" in m:
        g = m["grammar"]
        lp = g["mean_log_prob_of_grammatical"]
        ppl = g["exact_perplexity_of_grammatical"]
        lines += ["## Embedded grammar (exact)", "", "| grammatical | entropy / sentence | entropy / token | "
                  "true perplexity | mean log p of grammatical samples | their exact perplexity |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {100 * g['grammatical_share']:.1f}% | {g['entropy_per_sentence']:.3f} | "
                  f"{g['entropy_per_token']:.3f} | {g['true_perplexity']:.3f} | {'' if lp is None else f'{lp:.3f}'} | "
                  f"{'' if ppl is None else f'{ppl:.3f}'} |", ""]
    if ev.examples:
        lines += ["## Samples", ""] + [f"- {t}" for t in ev.examples] + [""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(ev: Evaluation, out_dir, command: str) -> Path:
    """Write the report's files into `out_dir` (created if needed). Everything is made in a temporary folder
    first and then renamed into place file by file; other files in `out_dir` are left alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=out))
    try:
        plots = _plots(ev, tmp)
        (tmp / "metrics.json").write_text(json.dumps(ev.to_dict(), indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(ev, plots, command))
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
