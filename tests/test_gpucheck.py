"""scripts/gpu-check.sh dry-run on a CPU with the tiny configs: the GPU run is known to start before GPU time is
spent on it. And its summary of a folder that a run cut short left half-written."""

import json
import subprocess
import sys

from difflm.gpucheck import figures, summary

from conftest import ROOT, subprocess_env


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out), "--dry-run"],
                          env=subprocess_env(PYTHON=sys.executable, WORK=str(tmp_path / "work")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = [json.loads(l) for l in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["bench", "train", "teacher", "eval"]
    assert all(s["rc"] == 0 for s in stages), stages
    f = figures(out)
    for key in ("training seq/s, difflm over recipe", "DeepSpeed ZeRO-2 step time over plain PyTorch",
                "sampling seq/s at 200 steps, best difflm over recipe",
                "E2E lm-score over the teacher's held-out perplexity", "diffusion training steps reached"):
        assert f[key] is not None and f[key] > 0, key
    assert f["diffusion training steps reached"] == 40 and f["teacher training steps reached"] == 40
    text = (out / "summary.md").read_text()
    assert text == summary(out) and "| bench | 0 |" in text
    assert "| training |" in (out / "bench.md").read_text()  # the tables, stderr apart in bench.log
    for run in ("model", "teacher"):  # small files back, no weights
        assert (out / "quality" / run / "training.png").is_file() and (out / "quality" / run / "card.md").is_file()
    assert not list(out.rglob("*.safetensors")) and (tmp_path / "work" / "model" / "model").is_dir()


def test_summary_of_a_run_cut_short(tmp_path):
    (tmp_path / "bench.jsonl").write_text(json.dumps({"section": "training", "name": "ratio", "ratio": 12.5}) + "\n"
                                          + '{"section": "engi')  # cut off mid-line
    f = figures(tmp_path)
    assert f["training seq/s, difflm over recipe"] == 12.5 and f["training MFU, difflm"] is None
    text = summary(tmp_path)
    assert "| training seq/s, difflm over recipe | 12.5 | >= 10 | yes |" in text
    assert "| E2E lm-score over the teacher's held-out perplexity | missing | <= 1.5 |  |" in text
