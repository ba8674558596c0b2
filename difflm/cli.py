"""`difflm` subcommands: parse arguments, load the config, call one library function.

User mistakes (DifflmError) end with a one-line message and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from .errors import DifflmError


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("difflm: %(message)s"))
    root = logging.getLogger("difflm")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
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

    cfg = load_config(args.config, args.overrides)
    train(cfg, show_progress=not args.no_progress)


def cmd_generate(args) -> None:
    from tqdm.auto import tqdm

    from .files import atomic_write_text
    from .text import generate, load_model

    if args.num_samples < 1:
        raise DifflmError(f"--num-samples must be positive, got {args.num_samples}")
    from .train import resolve_device

    model, tokenizer = load_model(resolve_model_dir(args.model), device=resolve_device(args.device))
    with tqdm(total=args.num_samples, desc="generate", disable=args.no_progress, dynamic_ncols=True) as bar:
        samples = generate(model, tokenizer, args.num_samples, steps=args.steps, sampler=args.sampler,
                           clamp=args.clamp, seed=args.seed, batch_size=args.batch_size, progress=bar.update)
    atomic_write_text(Path(args.out), "".join(json.dumps({"text": s.text, "ids": s.ids}) + "\n" for s in samples))
    logging.getLogger("difflm").info("wrote %d samples to %s", len(samples), args.out)
    for s in samples[: args.show]:
        print(s.text)


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


def cmd_check_grammar(args) -> None:
    from .grammar import BUILTIN, builtin_grammar

    if args.grammar not in BUILTIN:
        raise DifflmError(f"unknown grammar {args.grammar!r}; choose one of {', '.join(BUILTIN)}")
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
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample fixed-length text from a trained model")
    g.add_argument("--model", required=True, help="a model directory (or a training out_dir)")
    g.add_argument("--num-samples", type=int, required=True)
    g.add_argument("--out", required=True, help="JSON-lines output file")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    g.add_argument("--clamp", action="store_true", help="clamp each x0 estimate to its nearest word embeddings")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--show", type=int, default=0, help="also print the first N samples")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)

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
    except KeyboardInterrupt:
        print("difflm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
