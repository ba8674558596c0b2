"""The recipe after Diffusion-LM on the same core: the categorical x0 (CDCD / Plaid), normalised embeddings, time
warping, log-SNR endpoints and the noise scale, with self-conditioning; and the options that contradict."""

import json
import math

import pytest
import torch

from difflm.diffusion import TimeWarp
from difflm.schedules import NoiseScaled, Sqrt, get_schedule
from difflm.text import generate, load_model, save_model, text_loss

from conftest import ROOT
from test_cli import assert_user_error
from test_text import TEXTS, small_model, tokenizer  # noqa: F401 (a fixture)

TINY = str(ROOT / "configs" / "tiny.yaml")
RECIPE = {"model.output": "logits", "model.embedding_norm": "true", "model.ce_weight": "1.0",
          "model.self_condition": "true", "diffusion.time_warp_bins": "10"}


def test_categorical_x0_is_the_expected_embedding_under_the_logits(tokenizer):
    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.output": "logits"}).eval()
    x, t = torch.randn(2, 16, 8), torch.tensor([0.3, 0.9])
    x0, logits = model(x, t, return_logits=True)
    assert logits.shape == (2, 16, len(tokenizer)) and logits.dtype == torch.float32
    torch.testing.assert_close(x0, torch.softmax(logits, -1) @ model.embedding.weight)
    torch.testing.assert_close(model(x, t), x0)  # what a sampler or the bound receives


def test_normalised_embeddings_have_norm_sqrt_d_whatever_the_weights(tokenizer):
    model = small_model(tokenizer, **{"model.embedding_norm": "true"})
    with torch.no_grad():
        model.embedding.weight.mul_(torch.rand(len(tokenizer), 1) * 10)
    norms = model.embedding_matrix().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(8)))
    ids = torch.tensor([[0, 3, 1]])
    torch.testing.assert_close(model.embed(ids), model.embedding_matrix()[ids])
    assert torch.equal(model.rounding_weight(torch.float32), model.embedding_matrix())  # the head is tied to it


def test_time_warp_inverts_its_cdf_and_draws_where_the_loss_rises():
    warp = TimeWarp(20)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(warp.masses(), torch.full((20,), 0.05))  # nothing seen yet: uniform
    for _ in range(50):  # a loss that rises steeply around t = 0.6
        t = torch.rand(512, generator=g)
        warp.update(t, 5 * torch.sigmoid((t - 0.6) * 30))
    m = warp.masses()
    assert m.sum().item() == pytest.approx(1.0) and m.min().item() >= warp.floor / 20
    assert m.argmax().item() in (11, 12) and m[11:13].sum() > 0.3  # the steep part gets the draws
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(warp.cdf(warp.inverse_cdf(u)), u)
    draws = warp.sample(200_000, "cpu", generator=g)
    hist = torch.histc(draws, 20, 0, 1) / len(draws)
    torch.testing.assert_close(hist, m, atol=0.005, rtol=0)


def test_noise_scale_and_log_snr_endpoints():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    scaled = get_schedule("sqrt", noise_scale=2.0)
    assert isinstance(scaled, NoiseScaled)
    torch.testing.assert_close(scaled.log_snr(t), Sqrt().log_snr(t) - 2 * math.log(2.0))
    lin = get_schedule("logsnr-linear", log_snr_max=5.0, log_snr_min=-7.0)
    assert lin.log_snr(torch.tensor(0.0)).item() == 5.0 and lin.log_snr(torch.tensor(1.0)).item() == -7.0
    grid = get_schedule("logsnr-linear", 5.0, -7.0, noise_scale=2.0).discretize(4)
    torch.testing.assert_close(grid[-1], torch.sigmoid(torch.tensor(-7.0 - 2 * math.log(2.0), dtype=torch.float64)))


def test_the_whole_recipe_trains_saves_samples_and_bounds(tokenizer, tmp_path):
    """All options with self-conditioning: every loss part is finite, the warp is fitted to the cross-entropy and
    saved with the model, and sampling and the bound take the categorical x0 like any other."""
    from difflm.data import encode
    from difflm.metrics import bound_report

    torch.manual_seed(0)
    model = small_model(tokenizer, **RECIPE).train()
    ids, _ = encode(TEXTS * 8, tokenizer, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(20):
        losses = text_loss(model, ids, torch.Generator().manual_seed(step))
        losses.loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(v) for v in losses) and losses.cross_entropy > 0
    assert model.time_warp.seen.all() and (model.time_warp.level > 0).all()
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(loaded.time_warp.level, model.time_warp.level)
    samples = generate(loaded, tokenizer, 3, steps=5)
    assert len(samples) == 3 and all(len(s.ids) == 16 for s in samples)
    rep = bound_report(loaded, ids[:4], continuous=False, draws=2)
    assert math.isfinite(rep.nats_per_sequence.mean)


def test_resume_with_the_recipe_follows_the_uninterrupted_run(tmp_path):
    """The time warp's fit is in the checkpoint: a run stopped early and resumed logs the same losses."""
    from difflm.config import load_config
    from difflm.train import train

    run = [*(f"{k}={v}" for k, v in RECIPE.items()), "train.max_steps=20", "train.log_every=1", "train.eval_every=10",
           "model.dropout=0.1"]
    train(load_config(TINY, [f"train.out_dir={tmp_path / 'straight'}", *run]), show_progress=False)
    stopped = tmp_path / "stopped"
    first = train(load_config(TINY, [f"train.out_dir={stopped}", *run, "train.max_minutes=0.00001"]),
                  show_progress=False)
    assert first.stopped_by_time and first.steps < 20
    train(load_config(TINY, [f"train.out_dir={stopped}", *run]), show_progress=False, resume=True)

    def losses(out):
        return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(stopped) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=0)


@pytest.mark.parametrize("overrides,message", [
    (["model.output=logits", "diffusion.prediction=eps"], "model.output=logits makes the denoiser predict x0"),
    (["diffusion.time_warp_bins=500"], "diffusion.time_warp_bins=500 is finer than diffusion.num_steps=100"),
    (["diffusion.time_warp_bins=10", "diffusion.schedule=learned"], "use one of the two"),
    (["diffusion.log_snr_max=5"], "diffusion.schedule=sqrt has its own"),
    (["diffusion.log_snr_max=-12"], "diffusion.log_snr_max (-12) must be above diffusion.log_snr_min (-10)"),
    (["model.mse_weight=0"], "model.mse_weight and model.ce_weight are both 0"),
    (["model.output=categorical"], "unknown model.output 'categorical'"),
])
def test_contradicting_recipe_options_are_one_line_errors(tmp_path, capsys, overrides, message):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", *overrides], message)
    assert not (tmp_path / "o").exists()


def test_warped_times_in_training_and_uniform_times_for_the_dev_loss(tokenizer):
    from difflm.text import training_times

    model = small_model(tokenizer, **RECIPE)
    for _ in range(20):  # a fitted warp that puts its draws late
        t = torch.rand(256)
        model.time_warp.update(t, 5 * torch.sigmoid((t - 0.8) * 40))
    warped = training_times(model.train(), 4000, torch.Generator().manual_seed(0), torch.float32)
    assert warped.mean() > 0.7
    torch.testing.assert_close(warped * 50, (warped * 50).round(), rtol=0, atol=1e-4)  # on the trained steps i / T
    uniform = training_times(model.eval(), 4000, torch.Generator().manual_seed(0), torch.float32)
    torch.testing.assert_close(uniform, model.diffusion.sample_t(4000, "cpu", torch.Generator().manual_seed(0)))


def test_sampling_temperature_sharpens_the_categorical_x0(tokenizer):
    from difflm.errors import DifflmError
    from difflm.text import SamplingModelFn

    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.output": "logits", "model.self_condition": "true"}).eval()
    x, t = torch.randn(2, 16, 8), torch.tensor([0.3, 0.9])
    logits = model(x, t, return_logits=True)[1]
    fn = SamplingModelFn(model, temperature=0.5)
    out = fn(x, t)  # x0 = softmax(logits / 0.5) E, and fed back to the next call
    torch.testing.assert_close(out, torch.softmax(logits / 0.5, -1) @ model.embedding.weight)
    torch.testing.assert_close(fn.previous, out)
    torch.testing.assert_close(fn.logits, logits)  # the final tokens come from the logits themselves
    entropy = [-(p * p.log()).sum(-1).mean() for p in (torch.softmax(logits, -1), torch.softmax(logits / 0.5, -1))]
    assert entropy[1] < entropy[0]
    a = generate(model, tokenizer, 4, steps=5, seed=2, temperature=0.5)
    assert a == generate(model, tokenizer, 4, steps=5, seed=2, temperature=0.5) and len(a) == 4
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(DifflmError, match="--temperature must be a positive number"):
            generate(model, tokenizer, 2, steps=5, temperature=bad)
    with pytest.raises(DifflmError, match="needs a model with categorical output"):
        generate(small_model(tokenizer), tokenizer, 2, steps=5, temperature=0.5)


def test_the_models_own_sampling_temperature(tokenizer, tmp_path):
    from difflm.errors import DifflmError
    from difflm.text import SamplingModelFn

    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.output": "logits", "model.sample_temperature": "0.5"}).eval()
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.sample_temperature == 0.5  # saved with the model
    x, t = torch.randn(2, 16, 8), torch.tensor([0.3, 0.9])
    logits = loaded(x, t, return_logits=True)[1]
    fn = SamplingModelFn(loaded)  # no temperature asked: the model's
    assert fn.temperature == 0.5
    torch.testing.assert_close(fn(x, t), torch.softmax(logits / 0.5, -1) @ loaded.embedding.weight)
    assert SamplingModelFn(loaded, temperature=1.0).temperature == 1.0  # an explicit one wins
    assert generate(loaded, tokenizer, 3, steps=5, seed=1) == generate(loaded, tokenizer, 3, steps=5, seed=1,
                                                                        temperature=0.5)
    assert SamplingModelFn(small_model(tokenizer)).temperature == 1.0  # the default default
    with pytest.raises(DifflmError, match="model.sample_temperature=0.5 needs model.output=logits"):
        small_model(tokenizer, **{"model.sample_temperature": "0.5"})
    with pytest.raises(DifflmError, match="model.sample_temperature"):
        small_model(tokenizer, **{"model.output": "logits", "model.sample_temperature": "0"})


def test_temperature_on_the_command_line(tiny_run, tmp_path, capsys):
    assert_user_error(capsys, ["generate", "--model", str(tiny_run), "--num-samples", "2", "--steps", "5",
                               "--temperature", "0.5", "--out", str(tmp_path / "s.jsonl")], "categorical output")
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("overrides", [{}, {"model.sample_temperature": "0.5"},
                                       {"model.embedding_norm": "true", "model.output": "embedding"}])
def test_trajectories_end_on_the_samples(tokenizer, overrides):
    """The trajectories in eval's report decode each step's estimate as the samples are decoded (the logits' argmax
    of a categorical model, the rounding head on the normalised embeddings otherwise): their last column is the
    first samples that generate draws with the same seed."""
    from difflm.evaluation import trajectories

    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.output": "logits", "model.self_condition": "true", **overrides}).eval()
    with torch.no_grad():  # an untrained head: sharpen it so that decoding by logits and by rounding would differ
        model.embedding.weight.mul_(3.0)
    traj = trajectories(model, tokenizer, count=3, steps=8, seed=5)
    samples = generate(model, tokenizer, 3, steps=8, seed=5, batch_size=3)
    assert [tr.text[-1] for tr in traj] == [s.text for s in samples]
    assert all(len(tr.t) == 10 and tr.t[0] == 1.0 for tr in traj)
