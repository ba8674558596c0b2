"""The one exception type for user mistakes: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations

import contextlib
from typing import Sequence


class DifflmError(Exception):
    """Bad input from the user (a path, a config value, a model directory); the message names the fix."""


def check_choice(what: str, value, allowed: Sequence[str], hint: str = "") -> None:
    """The one wording for a value outside its allowed set: "unknown WHAT 'value'; choose one of A, B" + hint."""
    if value not in allowed:
        raise DifflmError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}{hint}")


@contextlib.contextmanager
def loading(path, what: str):
    """Turn any failure to read a saved directory (a corrupt or truncated weights file, a broken tokenizer or
    config) into one DifflmError naming the directory and the fix."""
    try:
        yield
    except DifflmError:
        raise
    except Exception as e:  # safetensors, json, torch and tokenizers each fail in their own way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DifflmError(f"could not load the {what} in {path} ({type(e).__name__}: {first}); its files are "
                          f"corrupt, truncated or of another model: train it again or restore a good copy") from None


class TrainingInterrupted(Exception):
    """Training stopped by SIGTERM or SIGINT after finishing a step and saving; `saved` says what was written and
    `resumable` whether `--resume` continues it (the CLI prints both and exits with 128 + the signal number)."""

    def __init__(self, signum: int, step: int, max_steps: int):
        super().__init__(f"stopped by signal {signum} at step {step} of {max_steps}")
        self.signum, self.step, self.max_steps = signum, step, max_steps
        self.saved, self.resumable = "", False
