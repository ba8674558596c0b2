"""The likelihood objective (model.objective=elbo): the continuous-time ELBO on the same core, its learned schedule
with the variance-minimizing gradient, low-discrepancy times, the posterior logits, and its bound."""

import json
import math

import pytest
import torch

from difflm.diffusion import GaussianDiffusion, VarianceGradient, gaussian_log_prob
from difflm.schedules import Learned
from difflm.text import elbo_loss, load_model, save_model, text_elbo

from conftest import ROOT
from test_cli import assert_user_error
from test_text import small_model, tokenizer  # noqa: F401 (a fixture)

TINY = str(ROOT / "configs" / "tiny.yaml")
ELBO = {"model.output": "logits", "model.embedding_norm": "true", "model.objective": "elbo",
        "model.posterior_logits": "true", "diffusion.schedule": "learned", "diffusion.num_steps": "null",
        "diffusion.log_snr_max": "1", "diffusion.log_snr_min": "-9"}


def _elbo_grads(variance: bool):
    """Gradients of a one-draw continuous ELBO on a learned schedule (hidden 8) and a one-weight denoiser."""
    torch.manual_seed(0)
    schedule = Learned(log_snr_max=4.0, log_snr_min=-6.0, hidden=8).double()
    with torch.no_grad():
        for p in (schedule.l2.weight, schedule.l2.bias, schedule.l3.weight):
            p.copy_(torch.randn_like(p))  # a schedule with a shape of its own
    d = GaussianDiffusion(schedule, num_steps=None)
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(32, 5, dtype=torch.float64)
    holder = VarianceGradient() if variance else None
    terms = d.elbo(lambda x, t: w * x, x0, t=d.sample_t(32, "cpu", generator=torch.Generator().manual_seed(1),
                                                          dtype=torch.float64),
                   generator=torch.Generator().manual_seed(2), variance=holder)
    if variance:
        holder.set_loss(terms.diffusion)
    interior = [schedule.l1.weight, schedule.l2.weight, schedule.l2.bias, schedule.l3.weight]
    ends = [schedule.gamma_0, schedule.gamma_1, w]
    return terms, interior, ends


def test_variance_gradient_gives_the_shape_the_second_moments_gradient_and_the_rest_the_losss():
    terms, interior, ends = _elbo_grads(variance=True)
    grads = torch.autograd.grad(terms.total.mean(), interior + ends)
    plain, p_interior, p_ends = _elbo_grads(variance=False)
    torch.testing.assert_close(terms.total, plain.total)  # the forward pass is unchanged
    norm = 2 * plain.diffusion.detach().mean()  # the gradient of E[L^2] / (2 mean L)
    want_interior = [g / norm for g in torch.autograd.grad((plain.diffusion ** 2).mean(), p_interior,
                                                           retain_graph=True)]
    want_ends = torch.autograd.grad(plain.total.mean(), p_ends)
    for got, want in zip(grads, [*want_interior, *want_ends]):
        torch.testing.assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in grads)


def test_variance_gradient_refuses_a_backward_without_the_loss():
    terms, interior, _ = _elbo_grads(variance=True)  # set_loss was called: fine
    holder = VarianceGradient()
    u = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="before set_loss"):
        holder.wrap(u).sum().backward()


def test_low_discrepancy_times_cover_the_range_evenly_and_stay_uniform():
    d = GaussianDiffusion(Learned(hidden=4), num_steps=None)
    g = torch.Generator().manual_seed(0)
    t = d.sample_t(64, "cpu", generator=g, low_discrepancy=True, dtype=torch.float64)
    gaps = torch.diff(torch.sort(t).values)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 64))
    assert t.min() >= 0 and t.max() < 1
    first = torch.stack([d.sample_t(8, "cpu", generator=g, low_discrepancy=True)[0] for _ in range(4000)])
    assert abs(first.mean().item() - 0.5) < 0.02  # each entry alone is U(0, 1)


def test_the_elbo_loss_draws_low_discrepancy_times_in_training_and_in_the_dev_loss(tokenizer, monkeypatch):
    model = small_model(tokenizer, **ELBO)
    ids = torch.randint(3, len(tokenizer), (16, 16))
    drawn = []
    sample_t = model.diffusion.sample_t

    def spy(*args, **kwargs):
        t = sample_t(*args, **kwargs)
        drawn.append(t)
        return t

    monkeypatch.setattr(model.diffusion, "sample_t", spy)
    for training in (True, False):
        model.train(training)
        drawn.clear()
        with torch.set_grad_enabled(training):
            elbo_loss(model, ids, torch.Generator().manual_seed(1))
        gaps = torch.diff(torch.sort(drawn[0].double()).values)
        torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 16), rtol=0, atol=1e-6)


def test_posterior_logits_are_the_exact_single_position_posterior(tokenizer):
    torch.manual_seed(0)
    model = small_model(tokenizer, **ELBO).eval()
    x, t = torch.randn(2, 16, 8), torch.tensor([0.2, 0.7])
    logits = model.posterior_logits(x, t)
    a = model.diffusion.alpha_bar(t)[:, None, None, None]
    e = model.embedding_matrix()
    direct = gaussian_log_prob(x[:, :, None, :], a.sqrt() * e, (1 - a).expand(2, 1, 1, 8)).sum(-1)  # (B, L, V)
    torch.testing.assert_close(torch.log_softmax(logits, -1), torch.log_softmax(direct, -1), rtol=1e-4, atol=1e-4)


def test_elbo_loss_trains_every_part_and_logs_its_terms(tokenizer):
    model = small_model(tokenizer, **ELBO, **{"model.self_condition": "true"}).train()
    ids = torch.randint(3, len(tokenizer), (16, 16))
    out = elbo_loss(model, ids, torch.Generator().manual_seed(0))
    out.loss.backward()
    s = model.diffusion.schedule
    assert s.gamma_0.grad != 0 and s.gamma_1.grad != 0 and s.l2.weight.grad.abs().sum() > 0
    assert model.embedding.weight.grad.abs().sum() > 0 and model.output_proj[2].weight.grad.abs().sum() > 0
    parts = out.parts()
    assert set(parts) == {"reconstruction", "diffusion", "prior", "log_snr_max", "log_snr_min"}
    assert parts["log_snr_max"].item() == pytest.approx(1.0) and parts["log_snr_min"].item() == pytest.approx(-9.0)
    total = parts["reconstruction"] + parts["diffusion"] + parts["prior"]
    torch.testing.assert_close(out.loss.detach(), total)


def test_embeddings_and_a_learned_schedule_can_have_their_own_learning_rates(tokenizer):
    from difflm.config import TrainConfig
    from difflm.engines import param_groups

    model = small_model(tokenizer, **ELBO)
    everything = {id(p) for p in model.parameters()}
    (plain,) = param_groups(model, TrainConfig(lr=1e-3, weight_decay=0.1))
    assert {id(p) for p in plain["params"]} == everything and "lr" not in plain
    net, emb, sched = param_groups(model, TrainConfig(lr=1e-3, weight_decay=0.1, embedding_lr=1e-2, schedule_lr=2e-2))
    assert [id(p) for p in emb["params"]] == [id(model.embedding.weight)]
    assert {id(p) for p in sched["params"]} == {id(p) for p in model.diffusion.schedule.parameters()}
    assert (emb["lr"], sched["lr"], emb["weight_decay"], sched["weight_decay"]) == (1e-2, 2e-2, 0.0, 0.0)
    ids = [id(p) for g in (net, emb, sched) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == everything  # every parameter in exactly one group
    (_, only_emb) = param_groups(model, TrainConfig(lr=1e-3, embedding_lr=1e-2))
    assert [id(p) for p in only_emb["params"]] == [id(model.embedding.weight)]


def test_eval_terms_score_the_reconstruction_on_every_row_and_self_condition_always(tokenizer):
    model = small_model(tokenizer, **ELBO, **{"model.self_condition": "true"}).eval()
    ids = torch.randint(3, len(tokenizer), (6, 16))
    t = torch.full((6,), 0.5)
    a = text_elbo(model, ids, torch.Generator().manual_seed(0), t=t)
    b = text_elbo(model, ids, torch.Generator().manual_seed(0), t=t)
    torch.testing.assert_close(a.total, b.total)  # no coin: the same draw gives the same bound
    assert torch.all(a.reconstruction > 0) and torch.all(a.prior > 0) and torch.all(a.diffusion > 0)


def test_a_learned_schedule_whose_endpoints_crossed_is_refused_at_load(tokenizer, tmp_path, capsys):
    model = small_model(tokenizer, **ELBO)
    with torch.no_grad():
        model.diffusion.schedule.gamma_0.fill_(5.0)  # log_snr(0) = -5, below log_snr(1) = -2: crossed
        model.diffusion.schedule.gamma_1.fill_(2.0)
    save_model(model, tokenizer, tmp_path / "m")
    capsys.readouterr()  # the save's progress bar
    assert_user_error(capsys, ["generate", "--model", str(tmp_path / "m"), "--num-samples", "1", "--steps", "2",
                               "--out", str(tmp_path / "s.jsonl")], "log-SNR endpoints crossed")
    assert not (tmp_path / "s.jsonl").exists()


def test_a_floor_keeps_the_learned_log_snr_0_above_it_and_travels_with_the_model(tokenizer, tmp_path):
    schedule = Learned(log_snr_max=1.0, log_snr_min=-9.0, hidden=8, log_snr_max_floor=-0.5)
    hi, lo = schedule.endpoints()
    assert hi.item() == pytest.approx(1.0) and lo.item() == pytest.approx(-9.0)  # it starts where asked
    hi.backward()
    assert schedule.log_snr_max_excess.grad.item() > 0  # the loss's gradient reaches it
    with torch.no_grad():
        schedule.log_snr_max_excess.fill_(-60.0)  # as far down as training could push it
    assert schedule.endpoints()[0].item() >= -0.5 and schedule.log_snr(torch.zeros(1)).item() >= -0.5
    model = small_model(tokenizer, **ELBO, **{"diffusion.log_snr_max_floor": "-0.5"})
    with torch.no_grad():
        model.diffusion.schedule.log_snr_max_excess.fill_(0.3)
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.log_snr_max_floor == -0.5
    torch.testing.assert_close(loaded.diffusion.schedule.endpoints()[0], model.diffusion.schedule.endpoints()[0])


def test_a_network_that_reads_the_log_snr_follows_the_schedule_not_t(tokenizer, tmp_path):
    """model.time_input=log_snr: the network reads s = (log_snr_max - log_snr(t)) / (log_snr_max - log_snr_min),
    close to t while the learned schedule is all but linear (at initialisation); once the schedule moves, the same noise
    level gives the same input at another t, and the output is the same function of (x_t, log-SNR)."""
    torch.manual_seed(0)
    model = small_model(tokenizer, **ELBO, **{"model.time_input": "log_snr", "model.self_condition": "true"}).eval()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(model.noise_input(t), t, atol=0.01, rtol=0)
    x = torch.randn(4, 16, 8)
    out = model(x, t)
    with torch.no_grad():  # the schedule moves: its endpoints go to +2 and -11 and its shape bends
        model.diffusion.schedule.gamma_0.fill_(-2.0)
        model.diffusion.schedule.gamma_1.fill_(11.0)
        model.diffusion.schedule.l3.weight.fill_(1.0)
    level = model.diffusion.schedule.log_snr(t).detach()
    torch.testing.assert_close(model.noise_input(t), (1.0 - level) / 10.0)
    t_same = model.diffusion.time_of_log_snr(torch.tensor([1.0, -1.5, -4.0, -9.0], dtype=torch.float64)).float()
    inputs = model.noise_input(t_same)
    torch.testing.assert_close(inputs, torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=1e-4, rtol=0)
    assert model.noise_input(t).requires_grad is False  # the schedule is not trained through the network's input
    plain = small_model(tokenizer, **ELBO).eval()
    assert plain.config.time_input == "t" and torch.equal(plain.noise_input(t), t)
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.time_input == "log_snr"
    torch.testing.assert_close(loaded.eval()(x, t), model(x, t))
    assert out.shape == x.shape


@pytest.mark.parametrize("overrides,message", [
    (["model.time_input=log_snr"], "model.time_input=log_snr reads the log-SNR of a continuous schedule"),
    (["model.time_input=sigma"], "unknown model.time_input 'sigma'"),
    (["diffusion.log_snr_max_floor=0"], "it contradicts diffusion.schedule=sqrt"),
    ([*(f"{k}={v}" for k, v in ELBO.items()), "diffusion.log_snr_max_floor=1"],
     "must be above diffusion.log_snr_max_floor (1)"),
    (["model.objective=elbo", "model.output=logits"], "set diffusion.num_steps=null"),
    (["model.objective=elbo", "model.output=logits", "diffusion.num_steps=null"], "diffusion.schedule=sqrt has none"),
    (["model.objective=elbo"], "model.objective=elbo needs model.output=logits"),
    ([*(f"{k}={v}" for k, v in ELBO.items()), "diffusion.schedule=logsnr-linear", "diffusion.time_warp_bins=10"],
     "contradicts diffusion.time_warp_bins=10"),
    ([*(f"{k}={v}" for k, v in ELBO.items()), "diffusion.noise_scale=2"], "diffusion.noise_scale=2 would shift them"),
    (["model.posterior_logits=true"], "model.posterior_logits adds to the network's logits"),
    (["model.objective=likelihood"], "unknown model.objective 'likelihood'"),
    (["train.schedule_lr=1e-2"], "diffusion.schedule=sqrt has no parameters"),
    (["model.self_condition_rows=0.25"], "it needs model.self_condition=true"),
    (["train.posterior_warmup_steps=100"], "it needs model.posterior_logits=true"),
    ([*(f"{k}={v}" for k, v in ELBO.items()), "train.posterior_warmup_steps=-1"],
     "train.posterior_warmup_steps must be"),
    (["model.self_condition=true", "model.self_condition_rows=0"], "model.self_condition_rows must be in (0, 1]"),
    (["model.self_condition=true", "model.self_condition_rows=1.5"], "model.self_condition_rows must be in (0, 1]"),
])
def test_contradicting_likelihood_options_are_one_line_errors(tmp_path, capsys, overrides, message):
    assert_user_error(capsys, ["train", "--config", TINY, f"train.out_dir={tmp_path / 'o'}", *overrides], message)
    assert not (tmp_path / "o").exists()


def test_eval_baseline_subtracts_another_models_bound_per_text_with_the_same_draws(tmp_path, capsys):
    """`eval --baseline`: the difference is this model's bound minus the baseline's as each scores alone (same
    texts, same seed), and a model against itself differs by exactly 0 (the draws are shared)."""
    from difflm.cli import main
    from difflm.config import load_config
    from difflm.data import encode, load_texts
    from difflm.metrics import bound_report, sequence_bounds

    run = [f"{k}={v}" for k, v in ELBO.items()] + ["model.self_condition=true", "train.embedding_lr=1e-2",
                                                    "train.schedule_lr=1e-2"]
    runs = {}
    for name, steps, more in (("a", 20, []), ("b", 5, []), ("short", 1, ["data.seq_len=20"])):
        runs[name] = tmp_path / name
        assert main(["train", "--config", TINY, f"train.out_dir={runs[name]}", *run, f"train.max_steps={steps}",
                     *more, "--no-progress"]) == 0
    out = tmp_path / "ev"
    common = ["--metrics", "bound", "--held-out", "24", "--bound-draws", "2", "--no-progress"]
    assert main(["eval", "--model", str(runs["a"]), "--out", str(out), *common, "--baseline", str(runs["b"])]) == 0
    paired = json.loads((out / "metrics.json").read_text())["metrics"]["bound_continuous"]
    assert paired["baseline"] == str(runs["b"]) and "Minus the baseline" in (out / "report.md").read_text()

    (a, tok), (b, _) = load_model(runs["a"] / "model"), load_model(runs["b"] / "model")
    ids, _ = encode(load_texts(load_config(TINY).data).dev[:24], tok, a.config.seq_len)
    alone_a, alone_b = (bound_report(m, ids, continuous=True, draws=2, seed=0) for m in (a, b))
    assert paired["nats_per_sequence"]["mean"] == pytest.approx(alone_a.nats_per_sequence.mean, rel=1e-9)
    assert paired["minus_baseline_per_sequence"]["mean"] == pytest.approx(
        alone_a.nats_per_sequence.mean - alone_b.nats_per_sequence.mean, rel=1e-9, abs=1e-9)
    assert paired["minus_baseline_per_token"]["mean"] == pytest.approx(
        alone_a.nats_per_token.mean - alone_b.nats_per_token.mean, rel=1e-9, abs=1e-9)
    itself = bound_report(a, ids, continuous=True, draws=2, seed=0,
                          baseline=sequence_bounds(a, ids, continuous=True, draws=2, seed=0).nll)
    assert (itself.minus_baseline_per_sequence.mean, itself.minus_baseline_per_sequence.se) == (0.0, 0.0)
    capsys.readouterr()

    base = ["eval", "--model", str(runs["a"]), "--out", str(tmp_path / "bad")]
    assert_user_error(capsys, base + ["--metrics", "diversity", "--baseline", str(runs["b"])],
                      "--baseline compares likelihood bounds; add bound to --metrics")
    assert_user_error(capsys, base + [*common, "--baseline", str(runs["short"])],
                      "has another vocabulary or sequence length")
    assert not (tmp_path / "bad").exists()


def test_a_likelihood_run_trains_samples_and_reports_a_bound_above_the_exact_entropy(tmp_path):
    """The whole chain on the tiny config: train on the ELBO, generate, eval; the bound is in continuous time only,
    with the gap to the grammar's exact -log p, and may not undercut the exact entropy beyond 3 SE."""
    from difflm.cli import main

    out = tmp_path / "run"
    run = [f"{k}={v}" for k, v in ELBO.items()] + ["model.self_condition=true", "train.max_steps=20",
                                                    "train.embedding_lr=1e-2", "train.schedule_lr=1e-2"]
    assert main(["train", "--config", TINY, f"train.out_dir={out}", *run, "--no-progress"]) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert "log_snr_max" in rows[0] and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    model, _ = load_model(out / "model")
    assert model.config.objective == "elbo" and model.diffusion.num_steps is None
    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--out", str(ev), "--metrics", "bound,grammar", "--num-samples", "8",
                 "--steps", "5", "--held-out", "48", "--bound-draws", "2", "--no-progress"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert "bound_discrete" not in metrics["metrics"]
    b = metrics["metrics"]["bound_continuous"]
    assert b["terms_per_sequence"]["rounding"] == 0 and b["terms_per_sequence"]["entropy"] == 0
    gap = b["gap_to_exact"]
    assert gap["mean"] > -3 * gap["se"]  # the bound is not below the truth
    assert b["nats_per_sequence"]["mean"] == pytest.approx(gap["mean"] + b["exact_nats_per_sequence"])
    shares = metrics["curve"]["share_by_decade"]
    assert sum(shares.values()) == pytest.approx(1.0) and len(metrics["curve"]["kl_per_step"]) == 0
    assert "Gap to the exact answer" in (ev / "report.md").read_text() and (ev / "denoising.png").exists()


def test_self_condition_rows_give_a_share_of_the_rows_their_first_estimate(tokenizer):
    """model.self_condition_rows=p (Plaid: 0.25): in every training call a share p of the rows, drawn row by row,
    reads the network's first estimate at its own z_t (the first pass runs on those rows alone); the others read
    zeros. p = 1 is every row of every batch; evaluation (self_condition=True) still conditions every row."""
    from difflm.text import _training_model_fn

    torch.manual_seed(0)
    model = small_model(tokenizer, **ELBO, **{"model.self_condition": "true",
                                              "model.self_condition_rows": "0.25"}).eval()
    calls = []  # (eval mode: no dropout between the passes compared)
    forward = model.forward

    def watch(x_t, t, x0_self=None, **kwargs):
        calls.append((x_t.clone(), x0_self))
        return forward(x_t, t, x0_self=x0_self, **kwargs)

    model.forward = watch
    x, t = torch.randn(64, 16, 8), torch.rand(64)
    with torch.no_grad():
        _training_model_fn(model, torch.Generator().manual_seed(0))(x, t)
    (first_x, first_self), (second_x, x0_self) = calls
    assert first_self is None and 0 < first_x.shape[0] < 64 and second_x.shape[0] == 64
    rows = x0_self.abs().sum((1, 2)) > 0  # the rows that read an estimate
    assert rows.sum() == first_x.shape[0] and 4 <= rows.sum() <= 28  # about a quarter of 64
    torch.testing.assert_close(first_x, x[rows])
    with torch.no_grad():
        torch.testing.assert_close(x0_self[rows], forward(x[rows], t[rows]))
    for share, self_condition, picked in ((1.0, None, 64), (0.25, True, 64), (0.25, False, 0)):
        model.config.self_condition_rows, calls[:] = share, []
        with torch.no_grad():
            _training_model_fn(model, torch.Generator().manual_seed(1), self_condition=self_condition)(x, t)
        x0_self = calls[-1][1]
        assert (0 if x0_self is None else int((x0_self.abs().sum((1, 2)) > 0).sum())) == picked
    model.config.self_condition_rows = 0.25
    del model.forward
    out = elbo_loss(model.train(), torch.randint(3, len(tokenizer), (16, 16)), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


def test_a_zero_initialised_head_starts_as_the_posterior_and_trains(tokenizer, tmp_path):
    """model.zero_init_output (Plaid): the head's last layer starts at zero, so a new network's logits are the
    posterior bias alone; it gets a gradient at once, and a saved model keeps its trained weights."""
    torch.manual_seed(0)
    model = small_model(tokenizer, **ELBO, **{"model.zero_init_output": "true"}).train()
    head = model.output_proj[-1]
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0
    x, t = torch.randn(2, 16, 8), torch.tensor([0.2, 0.7])
    _, logits = model(x, t, return_logits=True)
    torch.testing.assert_close(logits, model.posterior_logits(x, t))
    assert small_model(tokenizer, **ELBO).output_proj[-1].weight.abs().sum() > 0  # the default init is unchanged
    elbo_loss(model, torch.randint(3, len(tokenizer), (16, 16)), torch.Generator().manual_seed(0)).loss.backward()
    assert head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        head.weight.normal_()
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.zero_init_output
    torch.testing.assert_close(loaded.output_proj[-1].weight, head.weight)


def test_the_posterior_logits_warm_up_in_training_only(tokenizer):
    """train.posterior_warmup_steps (Plaid's bias warm-up): after n of W steps a training forward adds the posterior
    logits at weight n / W (then 1); evaluation adds them whole; the weight follows the step, also on resume."""
    from difflm.train import posterior_warmup

    torch.manual_seed(0)
    model = small_model(tokenizer, **ELBO, **{"model.dropout": "0"})
    x, t = torch.randn(2, 16, 8), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        net = model.eval()(x, t, return_logits=True)[1] - model.posterior_logits(x, t)
        assert posterior_warmup(model, 0, 0) is None and model.posterior_scale is None
        update = posterior_warmup(model, 4, start=1)  # a run resumed after one step
        assert float(model.posterior_scale) == 0.25
        for done, weight in ((1, 0.25), (0, 0.0), (3, 0.75), (4, 1.0), (9, 1.0)):
            update(done)
            torch.testing.assert_close(model.train()(x, t, return_logits=True)[1],
                                       net + weight * model.posterior_logits(x, t))
            torch.testing.assert_close(model.eval()(x, t, return_logits=True)[1], net + model.posterior_logits(x, t))
