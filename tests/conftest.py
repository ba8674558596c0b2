import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: Hub lookups fail fast instead of hanging.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile's kernels built in this process, not in a pool of compile workers (twice a run of the suite beside
# another one aborted inside a compile test; both runs shared the pool's machinery and the kernel cache)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# and into a cache of this run's own: a kernel cached on this machine under another configuration was reused and
# aborted inside a compile test (2026-12-01: built under AVX2 emulation, "index out of bounds" in the BERT
# embedding gather); a clean machine such as CI's compiles everything anyway
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="difflm-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# One thread count for this process and the runs it starts, whatever the machine's core count: float32 kernels may
# add in another order with another number of threads, and several tests compare runs step by step.
THREADS = 2
torch.set_num_threads(THREADS)


def metric_values(out, key="loss"):
    """The values of `key` in a training run's metrics.jsonl, in logged order."""
    import json

    return [r[key] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if key in r]


def subprocess_env(threads: int = THREADS, **extra):
    """This environment without the distributed variables that an in-process DeepSpeed run set (a child would
    otherwise try to join that process group's port), with `threads` torch threads per process (THREADS, as here,
    for a run compared with one of this process; 1 for each of several processes on two cores). MKL's count is set
    too: torch.set_num_threads sets both here, and an MKL_NUM_THREADS inherited from the shell would otherwise
    give the child another summation order."""
    dist = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in dist}, "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), **extra}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A model trained for a few steps with configs/tiny.yaml through the CLI (shared by the tests)."""
    from difflm.cli import main

    out = tmp_path_factory.mktemp("tiny")
    assert main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"train.out_dir={out}",
                 "--no-progress"]) == 0
    return out
