"""`difflm bench` on CPU: the same table as on a GPU, from the tiny config."""

from test_cli import assert_user_error, run


def test_bench_prints_training_and_sampling_tables(capsys):
    code, out, err = run(capsys, "bench", "--steps", "2", "--warmup", "1", "--batch", "32", "--sample-batch", "16",
                         "--vocab", "50", "--quality-sequences", "256")
    assert code == 0, err
    assert "| recipe | 64 | False | eager | False | False |" in out
    assert "| difflm | 32 | False | sdpa | False | False |" in out
    assert "training throughput ratio difflm / recipe:" in out
    assert "| recipe (fp32, ancestral) | 50 | 2000 |" in out and "| 16 | 50 |" in out
    assert "| plain PyTorch |" in out and "| DeepSpeed ZeRO-1 |" in out and "| DeepSpeed ZeRO-2 |" in out
    assert "| DeepSpeed ZeRO-3 |" in out
    assert "| sequences seen | dev loss, recipe (batch 64) | dev loss, difflm (batch 32) |" in out and "| 256 |" in out


def test_bench_bad_input(capsys):
    assert_user_error(capsys, ["bench", "--steps", "0"], "--steps must be positive")
    assert_user_error(capsys, ["bench", "--quality-sequences", "-1"], "must not be negative")
