"""Files and output directories: atomic writes (a reader never sees a half-written model directory, checkpoint or
output file) and the checks an output directory passes before a run writes to it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import DifflmError


class AtomicDir:
    """Write into a temporary sibling directory; on success it replaces `target` by renames."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_out_dir(path: Path, key: str, resume: bool = False, overwrite: bool = False) -> None:
    """A one-line error, before anything is written, for an output directory that cannot be one (a file, under a
    file, not writable) or that already holds a run which `resume` does not continue and `overwrite` does not
    replace (Hugging Face Trainer's overwrite_output_dir)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DifflmError(f"{key}={path} is an existing file, not a directory; choose another {key} or remove it")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DifflmError(f"{key}={path} lies under {ancestor}, which is a file; choose another {key}")
    if not os.access(ancestor, os.W_OK):
        raise DifflmError(f"{key}={path}: {ancestor} is not writable; choose another {key}")
    held = [name for name in ("model", "checkpoint", "metrics.jsonl") if (path / name).exists()]
    if held and not resume and not overwrite:
        raise DifflmError(f"{key}={path} already holds a run ({', '.join(held)}); continue it with --resume, replace "
                          f"it with --overwrite, or choose another {key}")


def start_out_dir(path: Path, overwrite: bool = False) -> None:
    """Create the output directory of a new run; with `overwrite`, first remove what a previous run left there, so
    that no stale checkpoint or model outlives it. Called once `check_out_dir` passed and the run is about to write;
    under a launcher only rank 0 calls it."""
    if overwrite:
        for name in ("model", "checkpoint", ".checkpoint.partial", ".checkpoint.old", "metrics.jsonl"):
            target = Path(path) / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    Path(path).mkdir(parents=True, exist_ok=True)
