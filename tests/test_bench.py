"""`difflm bench` on CPU: the same tables as on a GPU, from the tiny config."""

import json

import torch

from difflm.bench import count_host_syncs

from test_cli import assert_user_error, run


def test_bench_prints_every_table(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--steps", "2", "--warmup", "1", "--batch", "32", "--sample-batch", "16",
                         "--vocab", "50", "--quality-sequences", "256", "--json", str(tmp_path / "bench.jsonl"))
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "bench.jsonl").read_text().splitlines()]
    by = {(r["section"], r.get("name", r.get("sequences"))): r for r in rows}  # every printed row, as JSON too
    assert by[("training", "recipe")]["batch"] == 64 and by[("training", "ratio")]["ratio"] > 0
    assert {n for s, n in by if s == "engines"} == {"plain PyTorch"} | {f"DeepSpeed ZeRO-{k}" for k in range(4)}
    assert by[("engines", "DeepSpeed ZeRO-2")]["ratio_to_plain"] > 0 and ("quality", 256) in by
    assert [r["steps"] for r in rows if r["section"] == "sampling"] == [2000, 200, 50]
    assert "| recipe | 64 | False | eager | False | False |" in out
    assert "| difflm | 32 | False | sdpa | False | False |" in out
    assert "training throughput ratio difflm / recipe:" in out
    for engine in ("plain PyTorch", "DeepSpeed ZeRO-0", "DeepSpeed ZeRO-1", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3"):
        assert f"| {engine} |" in out
    assert "| sequences seen | dev loss, recipe (batch 64, lr 0.001) | dev loss, difflm (batch 32, lr 0.0005) |" in out
    assert "| 256 |" in out and "warm-up over the same number of sequences" in out
    assert "| recipe (fp32, ancestral) | 50 | 2000 |" in out and "| difflm (DDIM) | 16 | 200 |" in out
    assert "| difflm (DDIM) | 16 | 50 |" in out and "failed" not in out
    # difflm's own loop reads nothing back per step; DeepSpeed's ZeRO-1/2 optimizer checks the gradient norm
    assert "| recipe | 64 | False | eager | False | False |" in out and out.count(" | 0 |\n") >= 4


def test_bench_sections_and_bad_input(capsys):
    code, out, err = run(capsys, "bench", "--sections", "sampling", "--vocab", "50", "--sample-batch", "4")
    assert code == 0, err
    assert "| sampling |" in out and "| training |" not in out and "| engine" not in out
    assert_user_error(capsys, ["bench", "--steps", "0"], "--steps must be positive")
    assert_user_error(capsys, ["bench", "--quality-sequences", "-1"], "must not be negative")
    assert_user_error(capsys, ["bench", "--sections", "training,speed"], "choose among training, quality")
    assert_user_error(capsys, ["bench", "--lr-scale", "0"], "--lr-scale must be positive")
    assert_user_error(capsys, ["bench", "--json", "/no/such/dir/b.jsonl"], "give a file in an existing directory")


def test_host_syncs_are_counted():
    x = torch.ones(3)
    assert count_host_syncs(lambda: [x.sum().item() for _ in range(3)], torch.device("cpu")) == 3
    assert count_host_syncs(lambda: x.sum() * 2, torch.device("cpu")) == 0
