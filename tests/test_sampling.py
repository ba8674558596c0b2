"""Samplers and time grids: DPM-Solver++ against the exact probability-flow solution, grids on trained steps."""

import json
import math

import pytest
import torch

from difflm.diffusion import GaussianDiffusion, TimeWarp
from difflm.errors import DifflmError
from difflm.sampling import (LOGSNR_GRID_FLOOR, Sampler, ddim_sample, dpm_solver_sample, dpm_solver_weights,
                             sample, time_grid)
from difflm.schedules import Cosine, LogSNRLinear, Sqrt

from test_cli import assert_user_error, run
from test_core import gaussian_optimal_x0

F64 = torch.float64
M, S2 = 0.5, 0.04  # Gaussian data N(M, S2): its optimal x0 estimate and probability-flow ODE are closed-form


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ode_error(d, sampler, steps, n=500):
    """Max error of `sampler`'s output against the exact solution of the probability-flow ODE from the same x_T:
    (x_t - alpha_t M) / sqrt(alpha_t^2 S2 + sigma_t^2) is constant along it, and the last step returns x0_hat."""
    x_T = torch.randn(n, 1, generator=gen(0), dtype=F64)
    times = time_grid(d, steps, grid=sampler.grid)
    a_1, a_e = d.alpha_bar(times[[0, -1]]).tolist()
    x_e = math.sqrt(a_e) * M + math.sqrt(a_e * S2 + 1 - a_e) * (x_T - math.sqrt(a_1) * M) / math.sqrt(a_1 * S2 + 1 - a_1)
    model_fn = gaussian_optimal_x0(d, M, S2)
    exact = model_fn(x_e, torch.full((n,), times[-1].item(), dtype=F64))
    out = sample(d, model_fn, x_T.shape, steps=steps, sampler=sampler, x_T=x_T.clone(), dtype=F64)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("order,least_rate", [(1, 0.9), (2, 1.8), (3, 2.7)])
def test_dpm_solver_converges_at_its_order(order, least_rate):
    """Measured: halving the log-SNR step from 40 to 80 steps divides the error by 2^1.00, 2^2.06, 2^4.02."""
    d = GaussianDiffusion(LogSNRLinear(), num_steps=None, t_min=1e-3)
    sampler = Sampler("dpm++", "logsnr", order)
    errors = [ode_error(d, sampler, k) for k in (40, 80)]
    assert math.log2(errors[0] / errors[1]) > least_rate
    assert errors[1] < {1: 0.05, 2: 3e-3, 3: 1e-4}[order]


@pytest.mark.parametrize("grid", ["uniform", "logsnr"])
def test_dpm_solver_of_order_one_is_ddim(grid):
    d = GaussianDiffusion(Sqrt(), num_steps=2000)
    x_T = torch.randn(64, 3, generator=gen(1), dtype=F64)
    model_fn = gaussian_optimal_x0(d, M, S2)
    ddim = ddim_sample(d, model_fn, x_T.shape, steps=20, grid=grid, x_T=x_T.clone(), dtype=F64)
    dpm = dpm_solver_sample(d, model_fn, x_T.shape, steps=20, order=1, grid=grid, x_T=x_T.clone(), dtype=F64)
    torch.testing.assert_close(dpm, ddim)


def test_solver_weights_integrate_polynomials_exactly():
    """The weights of an order-m step integrate e^(tau - h) p(tau) exactly for p of degree < m (here x0 = a + b lambda
    + c lambda^2 along the path), against a fine quadrature."""
    lambdas, lam_s = [0.3, -0.2, -1.0], 0.9
    w = dpm_solver_weights(lambdas, lam_s)
    p = lambda lam: 1.5 - 2.0 * lam + 0.7 * lam ** 2  # noqa: E731
    h = lam_s - lambdas[0]
    tau = torch.linspace(0, h, 200001, dtype=F64)
    exact = torch.trapezoid(torch.exp(tau - h) * p(lambdas[0] + tau), tau).item()
    assert sum(wi * p(lam) for wi, lam in zip(w, lambdas)) == pytest.approx(exact, rel=1e-9)


def test_dpm_solver_with_an_oracle_returns_x0():
    d = GaussianDiffusion(Cosine(), num_steps=None, prediction="eps", t_min=1e-4)
    x0 = torch.randn(16, 3, generator=gen(2), dtype=F64)

    def eps_oracle(x_t, t):
        a = d.alpha_bar(t)[:, None]
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    for order in (1, 2, 3):
        out = dpm_solver_sample(d, eps_oracle, x0.shape, steps=15, order=order, dtype=F64, generator=gen(3))
        torch.testing.assert_close(out, x0)


def fitted_warp(bins=20):
    """A TimeWarp whose loss rises steeply over the first quarter of t and slowly after."""
    warp = TimeWarp(bins, rate=1.0)
    t = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    warp.update(t, torch.where(t < 0.25, 4 * t, 1 + 0.1 * (t - 0.25)))
    return warp


@pytest.mark.parametrize("grid", ["uniform", "logsnr", "warp"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 150, 2000])
def test_discrete_grids_hold_exactly_the_steps_asked_all_trained(grid, steps):
    """A discrete model is evaluated only at its trained times i/T, `steps` distinct ones from T down to 1."""
    d = GaussianDiffusion(Sqrt(), num_steps=2000)
    seen = []
    model_fn = lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x)  # noqa: E731
    sample(d, model_fn, (2, 3), steps=steps, sampler=Sampler("dpm++" if grid != "uniform" else "ddpm", grid),
           warp=fitted_warp(), dtype=F64)
    idx = [round(t * 2000) for t in seen]
    assert len(seen) == steps and all(abs(t * 2000 - i) < 1e-9 for t, i in zip(seen, idx))
    assert idx[0] == 2000 and all(a > b for a, b in zip(idx, idx[1:])) and (steps == 1 or idx[-1] == 1)


def test_logsnr_grid_is_uniform_in_log_snr_above_the_floor():
    cont = GaussianDiffusion(Cosine(), num_steps=None, t_min=1e-3)
    times = time_grid(cont, 12, grid="logsnr")
    lam = cont.log_snr(times)
    assert times[0] == 1.0 and lam[1].item() == pytest.approx(LOGSNR_GRID_FLOOR + (lam[-1].item() - LOGSNR_GRID_FLOOR)
                                                              / 11, abs=1e-6)
    torch.testing.assert_close(torch.diff(lam[1:]), torch.full((10,), (lam[-1] - lam[1]).item() / 10, dtype=F64))
    disc = GaussianDiffusion(LogSNRLinear(8.0, -8.0), num_steps=1000)  # above the floor: from t = 1 on
    steps = torch.diff(disc.log_snr(time_grid(disc, 11, grid="logsnr")))
    assert steps.max() - steps.min() < 0.02 and steps.mean().item() == pytest.approx(1.6 * (1 - 1e-3), rel=1e-2)


def test_warp_grid_spends_its_steps_where_the_loss_changes():
    d = GaussianDiffusion(LogSNRLinear(), num_steps=None)
    warp = fitted_warp()
    times = time_grid(d, 21, grid="warp", warp=warp)
    u = warp.cdf(times.float()).double()
    torch.testing.assert_close(torch.diff(u), torch.full((20,), (u[-1] - u[0]).item() / 20, dtype=F64), atol=1e-5,
                               rtol=0)
    assert (times < 0.25).sum() > 12  # the steep quarter of t gets most of the steps


def test_hooks_apply_to_the_solver():
    """denoise_fn, guide and callback see every DPM-Solver++ step; a guide's move changes the result."""
    d = GaussianDiffusion(Sqrt(), num_steps=100)
    model_fn = gaussian_optimal_x0(d, M, S2)
    seen, clamps = [], []
    x_T = torch.randn(4, 2, generator=gen(4), dtype=F64)
    plain = dpm_solver_sample(d, model_fn, x_T.shape, steps=10, x_T=x_T.clone(), dtype=F64)
    moved = dpm_solver_sample(d, model_fn, x_T.shape, steps=10, x_T=x_T.clone(), dtype=F64,
                              denoise_fn=lambda x0, t: clamps.append(1) or x0,
                              guide=lambda st: st.x_s + 0.1 * (st.index < 9),
                              callback=lambda st: seen.append((st.index, float(st.var.max()))))
    assert [i for i, _ in seen] == list(range(10)) and len(clamps) == 10 and all(v == 0 for _, v in seen)
    assert not torch.allclose(plain, moved)


def test_ddim_noise_above_the_posterior_is_capped_at_the_marginal():
    """eta > 1: sigma^2 = eta^2 (1 - abar_s)/(1 - abar_t)(1 - abar_t/abar_s) is capped at 1 - abar_s, where the step is
    a fresh draw from q(x_s | x0_hat); below the cap it is eta^2 times the posterior's variance."""
    d = GaussianDiffusion(Sqrt(), num_steps=100)
    x_T = torch.randn(4000, 1, generator=gen(5), dtype=F64)
    for eta in (1.0, 1.5, 50.0):
        seen = []
        ddim_sample(d, gaussian_optimal_x0(d, M, S2), x_T.shape, steps=10, eta=eta, x_T=x_T.clone(), dtype=F64,
                    generator=gen(6), callback=seen.append)
        for st in seen[:-1]:
            a_t, a_s = d.alpha_bar(st.t[:1]).item(), d.alpha_bar(st.s[:1]).item()
            posterior = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
            assert st.var[0].item() == pytest.approx(min(eta ** 2 * posterior, 1 - a_s), rel=1e-12)
            if eta == 50.0:  # re-noised from scratch: x_s - sqrt(abar_s) x0_hat ~ N(0, 1 - abar_s), x_t forgotten
                torch.testing.assert_close(st.mean, math.sqrt(a_s) * st.x0_hat)
                resid = st.x_s - math.sqrt(a_s) * st.x0_hat
                assert resid.var().item() == pytest.approx(1 - a_s, rel=0.1)


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "euler"}, "unknown sampler 'euler'; choose one of ddpm, ddim, dpm++"),
    ({"name": "dpm++", "order": 4}, "dpm++ has orders 1 to 3, got order 4"),
    ({"name": "ddim", "order": 2}, "a solver order is for dpm++; ddim is a first-order step"),
    ({"grid": "karras"}, "unknown time grid 'karras'; choose one of uniform, logsnr, warp"),
    ({"name": "dpm++", "eta": 0.5}, "eta is DDIM's noise level; dpm++ does not take one"),
])
def test_sampler_settings_it_does_not_have_are_refused(kwargs, message):
    with pytest.raises(DifflmError, match=message.replace("+", r"\+").replace("(", r"\(")):
        Sampler(**kwargs)


def test_grid_errors():
    d = GaussianDiffusion(Sqrt(), num_steps=100)
    with pytest.raises(DifflmError, match="the warp grid needs a model trained with time warping"):
        time_grid(d, 10, grid="warp")
    with pytest.raises(DifflmError, match="--steps must be between 1 and the model's 100 diffusion steps, got 101"):
        time_grid(d, 101, grid="logsnr")


@pytest.mark.parametrize("args,message", [
    (["--sampler", "dpm++", "--order", "5"], "dpm++ has orders 1 to 3, got order 5"),
    (["--order", "2"], "a solver order is for dpm++; ddpm is a first-order step (drop --order)"),
    (["--eta", "1.5"], "eta is DDIM's noise level; ddpm does not take one (use sampler ddim)"),
    (["--sampler", "ddim", "--eta", "-1"], "DDIM's eta must not be negative, got -1.0"),
    (["--grid", "exponential"], "unknown time grid 'exponential'"),
    (["--grid", "warp"], "the warp grid needs a model trained with time warping (diffusion.time_warp_bins > 0)"),
])
def test_bad_sampler_arguments_are_one_line_errors(tiny_run, tmp_path, capsys, args, message):
    argv = ["generate", "--model", str(tiny_run), "--out", str(tmp_path / "o.jsonl"), "--num-samples", "2"] + args
    assert_user_error(capsys, argv, message)
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_with_dpm_solver_through_the_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    code, _, err = run(capsys, "generate", "--model", str(tiny_run), "--out", str(out), "--num-samples", "3",
                       "--steps", "10", "--sampler", "dpm++", "--order", "3", "--grid", "logsnr", "--no-progress")
    assert code == 0, err
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3


def test_bench_measures_quality_against_steps_on_a_trained_model(tiny_run, tmp_path, capsys):
    code, out, err = run(capsys, "bench", "--sections", "sampling", "--model", str(tiny_run), "--sample-batch", "4",
                         "--num-samples", "4", "--quality-steps", "5,10,200", "--no-progress",
                         "--json", str(tmp_path / "b.jsonl"), "--plot", str(tmp_path / "q.png"))
    assert code == 0, err
    rows = [r for r in map(json.loads, (tmp_path / "b.jsonl").read_text().splitlines())
            if r["section"] == "sampling_quality"]
    assert (rows[0]["sampler"], rows[0]["steps"], rows[0]["speed_up"]) == ("ddpm, uniform grid", 100, 1.0)
    samplers = {r["sampler"] for r in rows[1:]}
    assert {"ddim, uniform grid", "ddim eta 2, uniform grid", "ddim eta 2, logsnr grid", "dpm++ order 2, logsnr grid",
            "dpm++ order 3, logsnr grid"} <= samplers
    assert {r["steps"] for r in rows[1:]} == {5, 10}  # 200 is more than the tiny model's T
    assert all(0 <= r["grammatical"] <= 1 and r["sequences_per_s"] > 0 for r in rows)
    assert "| sampler | passes | seq/s | speed-up | grammatical | entropy | distinct-2 | length |" in out
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert_user_error(capsys, ["bench", "--sections", "training", "--model", str(tiny_run)],
                      "--model measures sampling quality: add sampling to --sections")
    assert_user_error(capsys, ["bench", "--plot", str(tmp_path / "p.png")], "add --model DIR")
    assert_user_error(capsys, ["bench", "--sections", "sampling", "--model", str(tiny_run), "--quality-steps", "0,5"],
                      "--quality-steps '0,5': give positive step counts")
