"""Sample quality against network passes, sampler by sampler, on one trained model (`difflm bench --sections
sampling --model DIR`): for each sampler and step count K, `num_samples` samples from the same seeds, their
quality (the grammatical share on the embedded grammar; with a teacher, lm-score; unigram entropy, distinct-2 and
mean length always) and sequences/s, beside the recipe's sampler (ancestral, all T steps) in the same run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .files import atomic_write_bytes
from .metrics import distinct_n, unigram_entropy
from .sampling import Sampler
from .text import generate

STEP_COUNTS = (10, 20, 50, 100, 200)


@dataclass
class QualityRow:
    sampler: str
    steps: int  # network passes per sample
    sequences_per_s: float
    grammatical: Optional[float]  # share of samples the embedded grammar derives
    lm_score: Optional[float]  # the teacher's perplexity of the samples
    unigram_entropy: float
    distinct_2: float
    mean_length: float  # tokens per sample


FEW_STEP_ETA = 2.0  # DDIM's eta above the posterior's 1: the best few-step sampler measured (docs/benchmarks.md)


def default_samplers(model) -> List[Sampler]:
    """DDPM and DDIM on the uniform grid (difflm's samplers before DPM-Solver++), DDPM, DPM-Solver++ and DDIM with
    more noise than the posterior (eta = FEW_STEP_ETA) on the grids that space steps by noise level, and
    DPM-Solver++ of order 3 on the best-founded of those."""
    grids = ["logsnr"] + ["warp"] * (model.time_warp is not None)
    best = grids[-1]
    return ([Sampler("ddpm"), Sampler("ddim"), Sampler("ddpm", best)]
            + [Sampler("ddim", g, eta=FEW_STEP_ETA) for g in ("uniform", best)]
            + [Sampler("dpm++", g, 2) for g in ["uniform"] + grids] + [Sampler("dpm++", best, 3)])


def measure(model, tokenizer, sampler: Sampler, steps: int, num_samples: int, batch_size: int, seed: int = 0,
            grammar=None, teacher=None, show_progress: bool = False) -> QualityRow:
    """One row: `num_samples` samples by `sampler` in `steps` passes, timed (rounding included), then scored."""
    from tqdm.auto import tqdm

    with tqdm(total=num_samples, desc=f"{sampler.describe()}, {steps} passes", disable=not show_progress,
              dynamic_ncols=True, leave=False) as bar:
        start = time.perf_counter()
        texts = [s.text for s in generate(model, tokenizer, num_samples, steps=steps, sampler=sampler, seed=seed,
                                          batch_size=batch_size, progress=bar.update)]
        rate = num_samples / (time.perf_counter() - start)
    share = None
    if grammar is not None:
        share = sum(grammar.is_grammatical(t) for t in texts) / len(texts)
    score = None
    if teacher is not None:
        from .teacher import lm_score

        score = lm_score(teacher[0], teacher[1], texts, model.config.seq_len)
    return QualityRow(sampler.describe(), steps, rate, share, score, unigram_entropy(texts), distinct_n(texts, 2),
                      sum(len(t.split()) for t in texts) / len(texts))


def quality_against_steps(model, tokenizer, samplers: Sequence[Sampler], step_counts: Sequence[int] = STEP_COUNTS,
                          num_samples: int = 256, batch_size: int = 256, grammar=None, teacher=None,
                          emit: Callable[[str], None] = print, record: Optional[Callable[[dict], None]] = None,
                          plot: Optional[Path] = None, show_progress: bool = False) -> List[QualityRow]:
    """The table, row by row as measured (and each row to `record`): first the recipe's sampler at all T steps,
    then every sampler at every step count; the PNG of quality against passes to `plot` at the end."""
    total = model.diffusion.num_steps
    cols = ["sampler", "passes", "seq/s", "speed-up"] + ["grammatical"] * (grammar is not None) \
        + ["lm-score"] * (teacher is not None) + ["entropy", "distinct-2", "length"]
    emit("| " + " | ".join(cols) + " |")
    emit("| --- |" + " ---: |" * (len(cols) - 1))
    runs = ([(Sampler("ddpm"), total)] if total else []) + [(s, k) for s in samplers for k in step_counts
                                                           if total is None or k <= total]
    rows, base = [], None
    for sampler, k in runs:
        row = measure(model, tokenizer, sampler, k, num_samples, batch_size, grammar=grammar, teacher=teacher,
                      show_progress=show_progress)
        base = base or row.sequences_per_s
        rows.append(row)
        if record:
            record({"section": "sampling_quality", **asdict(row), "speed_up": row.sequences_per_s / base})
        cells = [row.sampler, f"{k:,}", f"{row.sequences_per_s:.2f}", f"{row.sequences_per_s / base:.1f}x"]
        if grammar is not None:
            cells.append(f"{100 * row.grammatical:.1f}%")
        if teacher is not None:
            cells.append(f"{row.lm_score:.2f}")
        cells += [f"{row.unigram_entropy:.3f}", f"{row.distinct_2:.3f}", f"{row.mean_length:.1f}"]
        emit("| " + " | ".join(cells) + " |")
    emit(f"\n({num_samples} samples per row from the same seeds, batch {batch_size}; speed-up against the first "
         "row, the recipe's sampler)\n")
    if plot is not None:
        atomic_write_bytes(Path(plot), plot_quality(rows, grammar is not None, teacher is not None))
        emit(f"(the figure: {plot})\n")
    return rows


def plot_quality(rows: List[QualityRow], grammar: bool, teacher: bool) -> bytes:
    """PNG: each quality measure against network passes (log scale), one line per sampler, the all-T ancestral
    sampler as a dashed level."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("grammatical", "grammatical share")] * grammar + [("lm_score", "lm-score (lower is better)")] * teacher
    panels += [("unigram_entropy", "unigram entropy (nats)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    reference = rows[0]
    names = list(dict.fromkeys(r.sampler for r in rows[1:]))
    for ax, (key, label) in zip(axes[0], panels):
        for name in names:
            pts = [(r.steps, getattr(r, key)) for r in rows[1:] if r.sampler == name]
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=name)
        ax.axhline(getattr(reference, key), color="black", linestyle="--",
                   label=f"{reference.sampler}, {reference.steps:,} passes")
        ax.set_xscale("log")
        if key == "lm_score":  # a poor row at few passes would squeeze the rest on a linear axis
            ax.set_yscale("log")
        ax.set_xlabel("network passes per sample")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
