"""`difflm` subcommands: parse arguments, load the config, call one library function.

User mistakes (DifflmError) end with a one-line message and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .errors import DifflmError, TrainingInterrupted, check_choice


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("difflm: %(message)s"))
    root = logging.getLogger("difflm")
    root.handlers[:] = [handler]
    quiet_rank = os.environ.get("RANK", "0") != "0"  # under a launcher, rank 0 speaks for all
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet_rank else logging.INFO)
    root.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_dir(path: str) -> str:
    """A training out_dir stands for its `model/` subdirectory."""
    p = Path(path)
    return str(p / "model") if (p / "model" / "config.json").is_file() else path


def cmd_train(args) -> None:
    from .config import load_config
    from .train import train

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args.config, args.overrides)
    train(cfg, show_progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)


def _config_for_model(args):
    """The config from --config, else the one saved with --model, with the overrides applied."""
    from .config import load_config
    from .train import TRAINING_CONFIG

    if args.config:
        return load_config(args.config, args.overrides)
    if getattr(args, "model", None):
        saved = Path(resolve_model_dir(args.model)) / TRAINING_CONFIG
        if saved.is_file():
            return load_config(str(saved), args.overrides)
        raise DifflmError(f"{args.model} has no {TRAINING_CONFIG}; pass --config for its data")
    raise DifflmError("pass --config configs/NAME.yaml (or --model DIR to reuse a model's data and tokenizer)")


def cmd_train_teacher(args) -> None:
    from .teacher import train_teacher
    from .text import load_model

    tokenizer = None
    cfg = _config_for_model(args)
    if args.model:
        model, tokenizer = load_model(resolve_model_dir(args.model), warn_unfinished=False)  # its tokenizer only
        if cfg.data.seq_len != model.config.seq_len:
            raise DifflmError(f"data.seq_len={cfg.data.seq_len} differs from the model's {model.config.seq_len}")
    train_teacher(cfg, tokenizer, show_progress=not args.no_progress, overwrite=args.overwrite)


def cmd_generate(args) -> None:
    from tqdm.auto import tqdm

    from .files import atomic_write_text
    from .precision import check_precision
    from .sampling import check_request
    from .text import generate, load_model, meaning_control, sampling_temperature

    from .image import is_image_model
    from .runtime import resolve_device

    if is_image_model(resolve_model_dir(args.model)):
        return _generate_images(args)
    model, tokenizer = load_model(resolve_model_dir(args.model), device=resolve_device(args.device))
    sampler = _sampler(args)
    check_request(model.diffusion, args.num_samples, args.steps, args.batch_size, sampler=sampler,
                  warp=model.time_warp)
    check_precision(args.precision, "--precision")
    temperature = sampling_temperature(model, args.temperature)
    meanings, control = _meanings(args.meanings), None
    if meanings is not None:
        control = meaning_control(model, meanings, args.free_weight)
    elif args.free_weight:
        raise DifflmError("--free-weight guides toward --meanings; give a file of meaning representations with it")
    with tqdm(total=args.num_samples, desc="generate", disable=args.no_progress, dynamic_ncols=True) as bar:
        samples = generate(model, tokenizer, args.num_samples, steps=args.steps, sampler=sampler,
                           clamp=args.clamp, seed=args.seed, batch_size=args.batch_size, progress=bar.update,
                           precision=args.precision, compile=args.compile, temperature=temperature, control=control)
    rows = [{"text": s.text, "ids": s.ids} | ({"meaning": meanings[i % len(meanings)]} if meanings else {})
            for i, s in enumerate(samples)]
    atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in rows))
    logging.getLogger("difflm").info("wrote %d samples to %s", len(samples), args.out)
    for s in samples[: args.show]:
        print(s.text)


def _meanings(path: Optional[str]) -> Optional[List[str]]:
    """The non-blank lines of a --meanings file (None without one)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise DifflmError(f"--meanings file {path} does not exist; write one meaning representation per line, "
                          f"e.g. name[The Eagle], food[French]")
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _generate_images(args) -> None:
    from tqdm.auto import tqdm

    from .image import generate_images, grid, load_image_model, save_png
    from .sampling import check_request
    from .runtime import resolve_device

    if args.precision != "fp32" or args.compile:
        raise DifflmError("--precision and --compile apply to text models")
    if args.columns is not None and args.columns < 1:
        raise DifflmError(f"--columns (the grid's width) must be positive, got {args.columns}")
    if Path(args.out).suffix.lower() != ".png":
        raise DifflmError(f"image samples are written as a PNG grid; give --out FILE.png, not {args.out}")
    model = load_image_model(resolve_model_dir(args.model), device=resolve_device(args.device))
    sampler = _sampler(args)
    check_request(model.diffusion, args.num_samples, args.steps, args.batch_size, sampler=sampler)
    with tqdm(total=args.num_samples, desc="generate", disable=args.no_progress, dynamic_ncols=True) as bar:
        images = generate_images(model, args.num_samples, steps=args.steps, sampler=sampler, seed=args.seed,
                                 batch_size=args.batch_size, progress=bar.update)
    columns = args.columns or max(1, round(args.num_samples ** 0.5))
    save_png(grid(images, columns), Path(args.out))
    logging.getLogger("difflm").info("wrote a grid of %d samples to %s", len(images), args.out)


def _sampler(args):
    """The sampling.Sampler of --sampler / --order / --eta / --grid (one-line errors for combinations it refuses)."""
    from .sampling import Sampler

    return Sampler(args.sampler, args.grid, args.order, args.eta)


def _add_temperature_argument(p) -> None:
    p.add_argument("--temperature", type=float, default=None,
                   help="model.output=logits: x0 = softmax(logits / T) E; below 1 more fluent, less diverse "
                   "(default: the model's, from model.sample_temperature in training)")


def _add_sampler_arguments(parser) -> None:
    from .sampling import GRIDS, SAMPLERS

    parser.add_argument("--sampler", default="ddpm", help=f"{', '.join(SAMPLERS)} (default ddpm: ancestral; "
                        "ddim: deterministic; dpm++: DPM-Solver++, few steps)")
    parser.add_argument("--order", type=int, default=None, help="dpm++: the solver's order, 1 to 3 (default 2)")
    parser.add_argument("--eta", type=float, default=None, help="ddim: the noise level (default 0, deterministic; "
                        "1 is ancestral; above 1 re-noises more, which helps at few steps)")
    parser.add_argument("--grid", default="uniform", help=f"the sampler's time grid: {', '.join(GRIDS)} (default "
                        "uniform in t; logsnr: uniform in log-SNR; warp: through the model's time-warping CDF)")


def read_samples(path: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise DifflmError(f"samples file {path} does not exist; write one with `difflm generate --out`")
    texts = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DifflmError(f"{path} line {n} is not a JSON object with a 'text' field") from None
    if not texts:
        raise DifflmError(f"samples file {path} is empty")
    return texts


def cmd_eval(args) -> None:
    from .evaluation import check_metrics, evaluate_model
    from .report import write_report
    from .text import load_model, sampling_temperature
    from .runtime import resolve_device

    if args.metrics is not None:
        metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    if args.num_samples < 1:
        raise DifflmError(f"--num-samples must be positive, got {args.num_samples}")
    from .image import evaluate_images, is_image_model

    if is_image_model(resolve_model_dir(args.model)):
        if args.baseline:
            raise DifflmError("--baseline is for text models; compare image models by their bits/dim")
        out = evaluate_images(resolve_model_dir(args.model), _config_for_model(args), args,
                              "difflm " + " ".join(sys.argv[1:]), sampler=_sampler(args))
        _add_to_card(args.model, "evaluation", "Evaluation", json.loads((out / "metrics.json").read_text()))
        logging.getLogger("difflm").info("wrote %s and %s", out / "metrics.json", out / "report.md")
        return
    samples = read_samples(args.samples) if args.samples else None
    device = resolve_device(args.device)
    model, tokenizer = load_model(resolve_model_dir(args.model), device=device)
    cfg = _config_for_model(args)
    if args.metrics is None:  # all that apply
        metrics = ["bound", "diversity"] + ["lm_score"] * bool(args.teacher)
        metrics += ["grammar"] * cfg.data.source.startswith("builtin:")
        if not args.teacher:
            logging.getLogger("difflm").warning("no --teacher given: lm-score skipped")
    teacher = None
    if args.teacher:
        from .teacher import load_teacher

        teacher = load_teacher(args.teacher, tokenizer, device=device)
    baseline = None
    if args.baseline:
        baseline, baseline_tokenizer = load_model(resolve_model_dir(args.baseline), device=device)
        if (baseline_tokenizer.get_vocab() != tokenizer.get_vocab()
                or baseline.config.seq_len != model.config.seq_len):
            raise DifflmError(f"--baseline {args.baseline} has another vocabulary or sequence length than --model "
                              f"{args.model}; a paired bound needs both to read the same token ids")
    temperature = sampling_temperature(model, args.temperature)
    sampler = _sampler(args)
    ev = evaluate_model(model, tokenizer, cfg, samples, metrics, teacher=teacher, num_samples=args.num_samples,
                        steps=args.steps, held_out=args.held_out, bound_draws=args.bound_draws, seed=args.seed,
                        model_name=args.model, show_progress=not args.no_progress, temperature=temperature,
                        sampler=sampler, baseline=baseline, baseline_name=args.baseline or "")
    out = write_report(ev, args.out, "difflm " + " ".join(sys.argv[1:]))
    sampling = ({"samples_from": args.samples} if args.samples
                else {"sampling_steps": args.steps, "sampler": sampler.describe(), "temperature": temperature}
                if ev.samples else {})  # none generated: only the bound was asked for
    _add_to_card(args.model, "evaluation", "Evaluation",
                 {"samples": ev.samples, "held_out": ev.held_out, **sampling, **ev.metrics})
    logging.getLogger("difflm").info("wrote %s and %s", out / "metrics.json", out / "report.md")


def _add_to_card(model: str, name: str, title: str, figures: dict) -> None:
    """This command's figures into the model's card (a model saved before cards existed is left as it is)."""
    from .card import CARD, add_section

    model_dir = Path(resolve_model_dir(model))
    if not (model_dir / CARD).is_file():
        logging.getLogger("difflm").warning("%s has no model card; the figures are only in the report", model_dir)
        return
    add_section(model_dir, name, title, figures, command="difflm " + " ".join(sys.argv[1:]))
    logging.getLogger("difflm").info("added the figures to %s", model_dir / CARD)


def cmd_bench(args) -> None:
    from .bench import SECTIONS, run
    from .config import load_config, positive_ints
    from .runtime import resolve_device

    device = resolve_device(args.device)
    config = args.config
    if args.model and config is None:
        cfg = _config_for_model(args)
    else:
        if config is None:  # the recipe's model on a GPU, the tiny one on a CPU
            name = "e2e.yaml" if device.type == "cuda" else "tiny.yaml"
            config = str(Path(__file__).resolve().parents[1] / "configs" / name)
        cfg = load_config(config, args.overrides)
    for name in ("steps", "warmup", "vocab"):
        if getattr(args, name) < 1:
            raise DifflmError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.lr_scale is not None and args.lr_scale <= 0:
        raise DifflmError(f"--lr-scale must be positive, got {args.lr_scale}")
    if args.quality_sequences is not None and args.quality_sequences < 0:
        raise DifflmError(f"--quality-sequences must not be negative, got {args.quality_sequences}")
    sections = list(SECTIONS) if args.sections == "all" else [p.strip() for p in args.sections.split(",") if p.strip()]
    unknown = [p for p in sections if p not in SECTIONS]
    if unknown or not sections:
        raise DifflmError(f"--sections {args.sections!r}: choose among {', '.join(SECTIONS)}")
    quality = args.quality_sequences if args.quality_sequences is not None else (128_000 if device.type == "cuda"
                                                                                 else 12_800)
    if args.model is None and (args.teacher or args.plot):
        raise DifflmError("--teacher and --plot are for the sampling quality of a trained model: add --model DIR")
    if args.model and "sampling" not in sections:
        raise DifflmError("--model measures sampling quality: add sampling to --sections")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise DifflmError(f"--plot writes a PNG: give FILE.png, not {args.plot}")
    if args.num_samples < 1:
        raise DifflmError(f"--num-samples must be positive, got {args.num_samples}")
    step_counts = positive_ints(args.quality_steps)
    if step_counts is None:
        raise DifflmError(f"--quality-steps {args.quality_steps!r}: give positive step counts, e.g. 10,20,50")
    quality_model = _sampling_quality_inputs(args, cfg, device) if args.model else None
    record = _json_lines(Path(args.json)) if args.json else None
    emit = lambda line: print(line, flush=True)  # noqa: E731
    run(cfg, args.vocab, device, steps=args.steps, warmup=args.warmup, fast_batch=args.batch,
        sample_batch=args.sample_batch, quality_sequences=quality, sections=sections, emit=emit,
        lr_scale=args.lr_scale, record=record)
    if quality_model is not None:
        from .sampler_quality import default_samplers, quality_against_steps

        model, tokenizer, grammar, teacher = quality_model
        emit(f"\n## Sampling quality against network passes: {args.model}\n")
        quality_against_steps(model, tokenizer, default_samplers(model), step_counts, num_samples=args.num_samples,
                              batch_size=args.sample_batch or 256, grammar=grammar, teacher=teacher, emit=emit,
                              record=record, plot=Path(args.plot) if args.plot else None,
                              show_progress=not args.no_progress)


def _sampling_quality_inputs(args, cfg, device):
    """(model, tokenizer, grammar or None, teacher or None) for the sampling-quality table, loaded before any
    measurement so that a bad path fails at once; `cfg` gives the model's data."""
    from .grammar import source_grammar
    from .text import load_model

    model, tokenizer = load_model(resolve_model_dir(args.model), device=device)
    grammar = source_grammar(cfg.data.source)
    teacher = None
    if args.teacher:
        from .teacher import load_teacher

        teacher = load_teacher(args.teacher, tokenizer, device=device)
    if grammar is None and teacher is None:
        raise DifflmError(f"{args.model} is not on the embedded grammar: give --teacher DIR for its lm-score")
    return model, tokenizer, grammar, teacher


def _json_lines(path: Path):
    """A function that appends one JSON line per call to `path` (emptied first), each flushed: a run cut short
    keeps what it measured."""
    if path.is_dir() or not path.parent.is_dir():
        raise DifflmError(f"--json {path}: give a file in an existing directory")
    path.write_text("")

    def record(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    return record


def cmd_train_classifier(args) -> None:
    from .classifier import TASKS, train_classifier
    from .text import load_model

    check_choice("classifier task", args.task, TASKS, " (length and infill need no classifier)")
    cfg = _config_for_model(args)
    model, tokenizer = load_model(resolve_model_dir(args.model))
    train_classifier(model, tokenizer, cfg, args.task, show_progress=not args.no_progress, overwrite=args.overwrite)


def _control_context(args, cfg, device):
    from .classifier import load_classifier
    from .control import ControlContext, guidance_sampler
    from .guidance import check_guidance_config
    from .sampling import check_request
    from .text import load_model, sampling_temperature

    check_guidance_config(cfg.guidance)
    sampler = guidance_sampler(cfg.guidance)
    model, tokenizer = load_model(resolve_model_dir(args.model), device=device)
    check_request(model.diffusion, getattr(args, "num_samples", 1), cfg.guidance.sampling_steps, args.batch_size,
                  "guidance.sampling_steps", sampler=sampler, warp=model.time_warp)
    classifiers = {}
    for path in args.classifier or []:
        clf = load_classifier(path, model, device=device)
        classifiers[clf.config.task] = clf
    return ControlContext(model, tokenizer, cfg.guidance, classifiers, free=getattr(args, "free", False),
                          temperature=sampling_temperature(model, args.temperature))


def _guidance_config(args):
    """The model's saved config (or --config) with the overrides: the guidance section and, for eval-control,
    the data whose held-out text gives the targets."""
    from .config import load_config

    try:
        return _config_for_model(args)
    except DifflmError:
        if args.config:
            raise
        return load_config(None, args.overrides)


def cmd_control(args) -> None:
    from tqdm.auto import tqdm

    from .control import controlled_generate, parse_target
    from .files import atomic_write_text
    from .runtime import resolve_device

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if len(tasks) != len(args.target):
        raise DifflmError(f"--task names {len(tasks)} task(s) but --target was given {len(args.target)} time(s); "
                          f"give one --target per task, in order")
    if len(set(tasks)) != len(tasks):
        raise DifflmError("a task is named twice in --task")
    cfg = _guidance_config(args)
    ctx = _control_context(args, cfg, resolve_device(args.device))
    targets = {task: [parse_target(task, spec, ctx)] * args.num_samples for task, spec in zip(tasks, args.target)}
    with tqdm(total=args.num_samples, desc="control", disable=args.no_progress, dynamic_ncols=True) as bar:
        samples = controlled_generate(ctx, targets, seed=args.seed, batch_size=args.batch_size, progress=bar.update)
    atomic_write_text(Path(args.out), "".join(json.dumps(s.to_dict()) + "\n" for s in samples))
    for task in tasks:
        rate = sum(s.success[task] for s in samples) / len(samples)
        print(f"{task} {targets[task][0].spec!r}: success {100 * rate:.1f}% of {len(samples)} samples")
    for s in samples[: args.show]:
        print(s.text)
    logging.getLogger("difflm").info("wrote %d samples to %s", len(samples), args.out)


def cmd_eval_control(args) -> None:
    from tqdm.auto import tqdm

    from .classifier import words_of
    from .control import TASKS, control_table, eval_control
    from .data import encode, load_texts
    from .files import AtomicDir
    from .teacher import load_teacher
    from .runtime import resolve_device

    for name in ("num_targets", "per_target"):
        if getattr(args, name) < 1:
            raise DifflmError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    task_sets = [[t.strip() for t in s.split("+") if t.strip()] for s in args.tasks.split(",") if s.strip()]
    for t in (t for s in task_sets for t in s):
        check_choice("task", t, TASKS + ("content-free",), " (in --tasks; + joins tasks)")
    cfg = _config_for_model(args)
    device = resolve_device(args.device)
    ctx = _control_context(args, cfg, device)
    teacher = load_teacher(args.teacher, ctx.tokenizer, device=device)[0] if args.teacher else None
    if teacher is None:
        logging.getLogger("difflm").warning("no --teacher given: lm-score skipped")
    texts = load_texts(cfg.data)
    ids, _ = encode(texts.dev[: args.held_out], ctx.tokenizer, ctx.model.config.seq_len)
    mrs = texts.dev_mr[: args.held_out] if texts.dev_mr else [""] * len(ids)
    total = args.num_targets * args.per_target * (len(task_sets) + 1)
    with tqdm(total=total, desc="eval-control", disable=args.no_progress, dynamic_ncols=True) as bar:
        rows, samples = eval_control(ctx, task_sets, (words_of(ids, ctx.tokenizer), mrs), teacher,
                                     args.num_targets, args.per_target, seed=args.seed, batch_size=args.batch_size,
                                     progress=bar.update)
    table = control_table(rows)
    with AtomicDir(Path(args.out)) as tmp:
        (tmp / "control.md").write_text(f"`difflm {' '.join(sys.argv[1:])}`\n\n" + table)
        (tmp / "control.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
        (tmp / "samples.jsonl").write_text("".join(json.dumps({"row": name, **s.to_dict()}) + "\n"
                                                   for name, rows_ in samples.items() for s in rows_))
    print(table, end="")
    _add_to_card(args.model, "control", "Controllable generation",
                 {"targets_per_task": args.num_targets, "samples_per_target": args.per_target,
                  **{r.name: {"success": r.success, "lm_score": r.lm_score, "samples": r.samples} for r in rows}})


def cmd_info(args) -> None:
    from .card import format_card, read_card

    model_dir = resolve_model_dir(args.model)
    if not Path(model_dir).is_dir():
        raise DifflmError(f"model directory {args.model} does not exist")
    print(format_card(read_card(model_dir)[0], model_dir), end="")


def cmd_check_grammar(args) -> None:
    from .grammar import BUILTIN, builtin_grammar

    check_choice("grammar", args.grammar, BUILTIN)
    g = builtin_grammar(args.grammar)
    texts = read_samples(args.samples)
    ok = [g.is_grammatical(t) for t in texts]
    print(f"grammatical: {sum(ok)}/{len(ok)} = {100 * sum(ok) / len(ok):.1f}% of samples under the "
          f"{args.grammar!r} grammar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflm", description="Continuous text diffusion on word embeddings.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a text diffusion model")
    t.add_argument("--config", required=True, help="configs/NAME.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=500")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--resume", action="store_true", help="continue exactly from <out_dir>/checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run that out_dir already holds")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (LOCAL_RANK)")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample fixed-length text from a trained model")
    g.add_argument("--model", required=True, help="a model directory (or a training out_dir)")
    g.add_argument("--num-samples", type=int, required=True)
    g.add_argument("--out", required=True, help="JSON-lines output file")
    g.add_argument("--steps", type=int, default=None, help="sampling steps, i.e. network passes (default: all T)")
    _add_sampler_arguments(g)
    g.add_argument("--clamp", action="store_true", help="clamp each x0 estimate to its nearest word embeddings")
    _add_temperature_argument(g)
    g.add_argument("--meanings", help="data-to-text (a model trained with model.attributes): a file of meaning "
                   "representations, one per line as E2E writes them; sample i is conditioned on line i mod lines")
    g.add_argument("--free-weight", type=float, default=0.0,
                   help="with --meanings: classifier-free guidance weight w (0, the default: the conditional model)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--precision", default="fp32", help="fp32, or bf16 (autocast on a CUDA GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA graphs on a GPU)")
    g.add_argument("--show", type=int, default=0, help="also print the first N samples")
    g.add_argument("--columns", type=int, default=None, help="image models: samples per row of the PNG grid")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)

    tt = sub.add_parser("train-teacher", help="train a GPT-2 teacher LM for lm-score on a model's data")
    tt.add_argument("--config", help="configs/NAME.yaml (data and teacher sections); default: the model's")
    tt.add_argument("--model", help="a difflm model whose tokenizer (and, without --config, data) to use")
    tt.add_argument("overrides", nargs="*", help="section.key=value, e.g. teacher.max_steps=500")
    tt.add_argument("--no-progress", action="store_true")
    tt.add_argument("--overwrite", action="store_true", help="replace a teacher that teacher.out_dir already holds")
    tt.set_defaults(func=cmd_train_teacher)

    e = sub.add_parser("eval", help="likelihood bound, lm-score, diversity (and grammar) with a report")
    e.add_argument("--model", required=True, help="a model directory (or a training out_dir)")
    e.add_argument("--out", required=True, help="directory for metrics.json, report.md and plots")
    e.add_argument("--teacher", help="a teacher LM directory (`difflm train-teacher`) for lm-score")
    e.add_argument("--samples", help="JSON-lines samples to score; default: generate --num-samples")
    e.add_argument("--config", help="config whose data gives the held-out text; default: the model's")
    e.add_argument("overrides", nargs="*", help="section.key=value applied to that config")
    e.add_argument("--metrics", default=None, help="comma-separated: bound,lm_score,diversity,grammar "
                   "(default: all that apply)")
    e.add_argument("--num-samples", type=int, default=256, help="samples to generate for lm_score, diversity and "
                   "grammar (none for the bound alone)")
    e.add_argument("--steps", type=int, default=200, help="sampling steps when generating")
    _add_sampler_arguments(e)
    _add_temperature_argument(e)
    e.add_argument("--held-out", type=int, default=512, help="held-out texts for the bound")
    e.add_argument("--bound-draws", type=int, default=16, help="stratified draws of t per held-out text")
    e.add_argument("--baseline", help="another model directory (same tokenizer and length): report this model's "
                   "bound minus its, paired per held-out text")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="training and sampling throughput: Diffusion-LM's recipe against difflm's")
    b.add_argument("--config", help="model to measure (default: configs/e2e.yaml on a GPU, configs/tiny.yaml on CPU)")
    b.add_argument("overrides", nargs="*", help="section.key=value")
    b.add_argument("--vocab", type=int, default=821, help="vocabulary size (821: Diffusion-LM's E2E)")
    b.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    b.add_argument("--batch", type=int, default=None, help="difflm's training batch (default 512 GPU, 256 CPU)")
    b.add_argument("--sample-batch", type=int, default=None, help="difflm's sampling batch (default 512/256)")
    b.add_argument("--quality-sequences", type=int, default=None,
                   help="train both variants on this many sequences and compare dev loss (default 128000 GPU, "
                   "12800 CPU; 0 skips)")
    b.add_argument("--sections", default="all",
                   help="comma-separated parts to measure: training, quality, engines, memory, sampling (default all)")
    b.add_argument("--lr-scale", type=float, default=None,
                   help="quality: the larger batch's learning rate over the config's (default: the batch ratio)")
    b.add_argument("--json", help="also write each measured row to this file as a JSON line, as it is measured")
    b.add_argument("--model", help="sampling: also measure sample quality against steps, sampler by sampler, on "
                   "this trained model (its config is the default --config)")
    b.add_argument("--teacher", help="with --model: the teacher LM for lm-score (needed off the embedded grammar)")
    b.add_argument("--num-samples", type=int, default=256, help="with --model: samples per sampler and step count")
    b.add_argument("--plot", help="with --model: write quality against network passes to this PNG")
    b.add_argument("--quality-steps", default="10,20,50,100,200",
                   help="with --model: the step counts to measure every sampler at (those above T are skipped)")
    b.add_argument("--no-progress", action="store_true", help="with --model: no progress bar per row")
    b.add_argument("--device", default="auto")
    b.set_defaults(func=cmd_bench)

    tc = sub.add_parser("train-classifier", help="train a noisy classifier on a model's latents for guided control")
    tc.add_argument("--model", required=True, help="the diffusion model (its data, tokenizer and latents)")
    tc.add_argument("--task", required=True, help="content, pos or syntax")
    tc.add_argument("--config", help="configs/NAME.yaml (data and classifier sections); default: the model's")
    tc.add_argument("overrides", nargs="*", help="section.key=value, e.g. classifier.max_steps=500")
    tc.add_argument("--no-progress", action="store_true")
    tc.add_argument("--overwrite", action="store_true", help="replace a classifier its out_dir already holds")
    tc.set_defaults(func=cmd_train_classifier)

    def control_args(p):
        p.add_argument("--model", required=True, help="a model directory (or a training out_dir)")
        p.add_argument("--classifier", action="append", help="a classifier directory (repeat for several tasks)")
        p.add_argument("--config", help="config for the guidance section (and data); default: the model's")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. guidance.step_size=0.05")
        p.add_argument("--seed", type=int, default=0)
        _add_temperature_argument(p)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default="auto")
        p.add_argument("--no-progress", action="store_true")

    co = sub.add_parser("control", help="guided generation toward targets (content, length, infill, pos, syntax)")
    control_args(co)
    co.add_argument("--task", required=True, help="a task, or several joined by commas (e.g. content,length)")
    co.add_argument("--target", action="append", required=True,
                    help="one per task: food=Italian | 12 | 'The _ _ is _ .' | 'PROPN AUX DET NOUN' | '0-2:NOUN'")
    co.add_argument("--num-samples", type=int, required=True)
    co.add_argument("--out", required=True, help="JSON-lines output, one sample per line with its success")
    co.add_argument("--free", action="store_true", help="content by classifier-free guidance (model.attributes)")
    co.add_argument("--show", type=int, default=0, help="also print the first N samples")
    co.set_defaults(func=cmd_control)

    ec = sub.add_parser("eval-control", help="Diffusion-LM's control table: success and lm-score per task")
    control_args(ec)
    ec.add_argument("--teacher", help="a teacher LM directory for lm-score")
    ec.add_argument("--tasks", default="content,length,infill,pos,syntax,content+length",
                    help="comma-separated task sets; + joins tasks; content-free for classifier-free guidance")
    ec.add_argument("--num-targets", type=int, default=10, help="targets per task, drawn from held-out text")
    ec.add_argument("--per-target", type=int, default=5, help="samples per target")
    ec.add_argument("--held-out", type=int, default=1000, help="held-out texts to draw targets from")
    ec.add_argument("--out", required=True, help="directory for control.md, control.json and samples.jsonl")
    ec.set_defaults(func=cmd_eval_control)

    i = sub.add_parser("info", help="what a saved model is: its card's facts (architecture, data, training, scores)")
    i.add_argument("--model", required=True, help="a model directory (or a training out_dir)")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("check-grammar", help="share of samples the embedded grammar can derive")
    c.add_argument("--samples", required=True, help="JSON-lines file from `difflm generate`")
    c.add_argument("--grammar", default="restaurants")
    c.set_defaults(func=cmd_check_grammar)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except DifflmError as e:
        print(f"difflm: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # every rank stopped at the same step and took part in the save
        from .runtime import rank

        if rank() == 0:
            print(f"difflm: stopped by {signal.Signals(e.signum).name} at step {e.step} of {e.max_steps}; {e.saved}"
                  + (f"; resume with: {_resume_command(argv)}" if e.resumable else ""), file=sys.stderr)
        code = 128 + e.signum
    except KeyboardInterrupt:
        print("difflm: interrupted", file=sys.stderr)
        return 130
    else:
        code = 0
    from .runtime import world_size

    if world_size() > 1:
        _exit_distributed(code)
    return code


def _resume_command(argv: Optional[List[str]]) -> str:
    """This command line with --resume (and without --overwrite, which would start over)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    return shlex.join(["difflm", *args, *(["--resume"] if "--resume" not in args else [])])


def _exit_distributed(code: int) -> None:
    """Leave a multi-process run cleanly: gloo workers sometimes abort in interpreter teardown after all work is
    done ("terminate called without an active exception"), so shut the group down and exit at once."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
