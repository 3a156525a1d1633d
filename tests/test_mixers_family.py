"""The mixer family (issue 9): apply=sample|loss, the bandit's estimators against EXP3, ADO, Sheared-LLaMA,
Aioli and static temperature priors, each on its pure functions and a simulator (spec sections 2, 3, 6, 7)."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import roundtrip, synthetic_domains, tiny_gpt

from dataflex.core.events import Event
from dataflex.core.state import DataState
from dataflex.data.domains import MixtureDataset
from dataflex.grad.interface import TorchInterface
from dataflex.mixers import (
    MIXERS,
    ADOMixer,
    AioliMixer,
    BanditMixer,
    ShearedMixer,
    StaticMixer,
    ado_preference,
    aioli_eg_step,
    aioli_mixtures,
    aioli_normalize,
    aioli_unmix,
    clip_min_probability,
    domain_loss_weights,
    fit_power_law,
    power_law,
    read_reference,
    resolve_weights,
    sheared_update,
    temperature_weights,
)
from dataflex.session.flex import DataFlex


def new_state(K=3, batch=16, sizes=None):
    return DataState([f"d{i}" for i in range(K)], sizes or [100] * K, batch)


# -- apply = sample | loss --------------------------------------------------------------------------

def test_domain_loss_weights_formula_and_errors():
    w = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    torch.testing.assert_close(domain_loss_weights(w, q), torch.tensor([2.0, 1.2, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="never sampled"):
        domain_loss_weights(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))


def test_apply_loss_draws_from_sizes_and_sets_loss_weights():
    mixer = StaticMixer(weights=[0.6, 0.3, 0.1], apply="loss")
    assert mixer.apply_to == "loss" and StaticMixer().apply_to == "sample"
    state = new_state(sizes=[10, 30, 60])
    mixer.apply(Event.FIT_START, state)
    mixer.apply(Event.BEFORE_SAMPLE, state)
    q = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    torch.testing.assert_close(state.domain_weights, q)
    torch.testing.assert_close(state.domain_loss_weights, torch.tensor([6.0, 1.0, 1 / 6], dtype=torch.float64))
    assert state.metrics["mixer/weight/d0"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="'sample' or 'loss'"):
        BanditMixer(apply="both")
    # every registered mixer takes it (DoReMi declares it itself)
    for name in ("static", "bandit", "ado"):
        assert MIXERS.build(name, apply="loss").apply_to == "loss"
    assert MIXERS.build("aioli", apply="loss").apply_to == "loss"
    assert MIXERS.build("sheared", reference_loss={"a": 1.0}, apply="loss").apply_to == "loss"


def test_apply_loss_gives_the_same_gradient_in_expectation():
    """Linear regression per domain: E over draws from w of the batch-mean gradient equals E over draws
    from q of the (w/q)-weighted batch-mean gradient; the self-normalised form (what the session does)
    agrees up to its O(1/B) bias."""
    g = torch.Generator().manual_seed(0)
    K, dim, B, draws = 3, 4, 32, 4000
    centres = torch.randn(K, dim, generator=g, dtype=torch.float64) * 2
    theta = torch.zeros(dim, dtype=torch.float64)
    w = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    lw = domain_loss_weights(w, q)

    def grads(dist, weigh):
        d = torch.multinomial(dist.expand(draws, K), B, replacement=True, generator=g)     # [draws, B]
        x = centres[d] + 0.5 * torch.randn(draws, B, dim, generator=g, dtype=torch.float64)
        per_sample = 2 * (theta - x)                                                     # grad of |theta - x|^2
        sw = lw[d] if weigh else torch.ones(draws, B, dtype=torch.float64)
        plain = (sw[..., None] * per_sample).mean(1).mean(0)
        normalised = ((sw[..., None] * per_sample).sum(1) / sw.sum(1, keepdim=True)).mean(0)
        return plain, normalised

    exact = (w[:, None] * 2 * (theta - centres)).sum(0)
    by_sampling, _ = grads(w, weigh=False)
    by_loss, by_loss_normalised = grads(q, weigh=True)
    torch.testing.assert_close(by_sampling, exact, atol=0.03, rtol=0)
    torch.testing.assert_close(by_loss, exact, atol=0.05, rtol=0)
    assert (by_loss_normalised - exact).norm() / exact.norm() < 0.1      # self-normalised: biased O(1/B)


def test_apply_loss_reaches_the_session_loss():
    model = tiny_gpt()
    flex = DataFlex(synthetic_domains(n_per_domain=8), global_batch_size=8,
                    plugins=[StaticMixer(weights={"A": 0.5, "B": 0.25, "C": 0.25}, apply="loss")],
                    interface=TorchInterface(model))
    batch = flex.next_batch()
    torch.testing.assert_close(flex.state.domain_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(flex.state.domain_loss_weights, torch.tensor([1.5, 0.75, 0.75], dtype=torch.float64))
    flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
    rec = flex.end_step()
    expected = torch.tensor([1.5, 0.75, 0.75], dtype=torch.float64)[flex.state.batch_domains]
    torch.testing.assert_close(torch.tensor(rec["ledger"]["weight"], dtype=torch.float64), expected * 8 / expected.sum())
    assert rec["mixer/weight/A"] == pytest.approx(0.5)


# -- the bandit against EXP3 on a simulator ----------------------------------------------------------

def simulate_bandit(mixer, means, steps, batch=16, seed=0, noise=0.0):
    K = len(means)
    means = torch.tensor(means, dtype=torch.float64)
    state = new_state(K, batch)
    mixer.apply(Event.FIT_START, state)
    g = torch.Generator().manual_seed(seed)
    policies, drawn = [], []
    for _ in range(steps):
        state.metrics = {}
        mixer.apply(Event.BEFORE_SAMPLE, state)
        d = torch.multinomial(state.domain_weights, batch, replacement=True, generator=g)
        drawn.append(d)
        state.batch_domains = d
        state.losses = (means[d] + noise * torch.randn(batch, generator=g, dtype=torch.float64)).float()
        mixer.apply(Event.BATCH_END, state)
        policies.append(mixer.policy.clone())
        state.step += 1
    return torch.stack(policies), drawn


def test_count_estimator_behaves_like_exp3_with_one_draw_per_step():
    """Constant losses, cumulative EXP3: one domain per step (the paper's draw) converges on the best
    arm; per-sample draws with the count-weighted estimator do the same, while dividing the mean loss
    by pi stalls (the best arm's share stays under 0.5 where the others pass 0.9)."""
    means = [1.0, 2.0, 3.0, 4.0]
    step, drawn = simulate_bandit(BanditMixer(variant="cumulative", draw="step"), means, 600)
    assert all(len(set(d.tolist())) == 1 for d in drawn)          # one domain per step
    count, _ = simulate_bandit(BanditMixer(variant="cumulative"), means, 600)
    biased, _ = simulate_bandit(BanditMixer(variant="cumulative", estimator="paper"), means, 600)
    assert step[-1, 3] > 0.9 and count[-1, 3] > 0.9
    assert abs(step[-1, 3] - count[-1, 3]) < 0.02
    assert biased[-1, 3] < 0.5


def test_count_estimator_keeps_the_arg_max_at_a_large_reward_scale():
    means = [1.0, 2.0, 3.0, 4.0]
    flips = {}
    for est in ("count", "paper"):
        P, _ = simulate_bandit(BanditMixer(variant="cumulative", reward_scale=15.0, estimator=est), means, 400)
        top = P[-100:].argmax(1)
        flips[est] = int((top[1:] != top[:-1]).sum())
    assert flips["count"] == 0 and flips["paper"] > 10, flips


def test_step_draw_is_seeded_and_restores_exactly():
    a = BanditMixer(draw="step", seed=3)
    b = BanditMixer(draw="step", seed=3)
    Pa, da = simulate_bandit(a, [1.0, 2.0, 3.0], 20)
    Pb, db = simulate_bandit(b, [1.0, 2.0, 3.0], 20)
    assert torch.equal(Pa, Pb) and all(torch.equal(x, y) for x, y in zip(da, db))
    # save after 20 steps, continue 10 more; a fresh mixer loaded from the save draws the same domains
    state = new_state(3)
    state.step = 20
    sd = roundtrip(a.state_dict())
    c = BanditMixer(draw="step", seed=99)
    c.apply(Event.FIT_START, state)
    c.load_state_dict(sd)
    for _ in range(10):
        a.apply(Event.BEFORE_SAMPLE, state)
        wa = state.domain_weights.clone()
        c.apply(Event.BEFORE_SAMPLE, state)
        assert torch.equal(wa, state.domain_weights) and wa.max() == 1
    with pytest.raises(ValueError, match="apply=sample"):
        BanditMixer(draw="step", apply="loss").apply(Event.FIT_START, new_state(3))


def test_explore_floor_floors_the_exploration_rate():
    mixer = BanditMixer(variant="cumulative", explore_floor=0.05, reward_scale=5.0)
    P, _ = simulate_bandit(mixer, [0.1, 8.0, 0.1], 300)              # eps_300 = 0.035 < 0.05
    assert P[-1].min() >= 0.05 - 1e-12 and P[-1].min() < 0.051
    with pytest.raises(ValueError, match="explore_floor"):
        BanditMixer(explore_floor=0.5).apply(Event.FIT_START, new_state(3))


# -- static: temperature and files -------------------------------------------------------------------

def test_static_temperature_and_mixture_files(tmp_path):
    names, sizes = ["a", "b", "c"], [10, 30, 60]
    torch.testing.assert_close(resolve_weights("size", names, sizes, temperature=0.5),
                               torch.tensor([1, 3 ** 0.5, 6 ** 0.5], dtype=torch.float64) / (1 + 3 ** 0.5 + 6 ** 0.5))
    torch.testing.assert_close(temperature_weights(torch.tensor([0.2, 0.8, 0.0]), 2.0),
                               torch.tensor([0.04, 0.64, 0.0], dtype=torch.float64) / 0.68)
    assert resolve_weights("size", names, sizes, temperature=1e-6).sub(1 / 3).abs().max() < 1e-5
    (tmp_path / "m.json").write_text(json.dumps({"weights": {"a": 1, "c": 3}, "predicted_loss": 2.0}))
    (tmp_path / "m.yaml").write_text("a: 2\nb: 2\n")
    torch.testing.assert_close(resolve_weights(str(tmp_path / "m.json"), names, sizes),
                               torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    mixer = StaticMixer(weights=str(tmp_path / "m.yaml"))
    state = DataState(names, sizes, 4)
    mixer.apply(Event.FIT_START, state)
    mixer.apply(Event.BEFORE_SAMPLE, state)
    torch.testing.assert_close(state.domain_weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not found"):
        resolve_weights(str(tmp_path / "missing.json"), names, sizes)
    with pytest.raises(ValueError, match="temperature"):
        resolve_weights("size", names, sizes, temperature=0)


# -- ADO (spec 6) -----------------------------------------------------------------------------------

@pytest.mark.parametrize("truth", [(3.0, 0.7, 0.4), (1.5, 1.2, 0.25), (4.0, 0.6, 0.6)])
def test_ado_fit_recovers_power_law(truth):
    n = 16 * np.arange(1, 400, 10)
    fit = fit_power_law(n, power_law(n, *truth), n_starts=4)
    np.testing.assert_allclose(fit, truth, atol=2e-3)


# a transcription of the reference's AdoSelector.curr_dist and clip_min_probability (yidingjiang/ado,
# src/data_selectors/ado.py, written from reading it): `superseded` is its first release's credit term

def ref_clip_min_probability(probs, min_prob):
    deficit = max(min_prob * len(probs) - probs.sum(), 0)
    scaled = probs * ((1 - deficit) / probs.sum())
    clipped = np.maximum(scaled, min_prob)
    return clipped / clipped.sum()


def ref_curr_dist(params, n_seen, empirical_dist, p_history, p_avg, itr, superseded=False):
    log_beta, log_eps, alpha = params[:, 0], params[:, 1], params[:, 2]
    irred = np.exp(log_eps)
    expnt = np.maximum(alpha, 0.05)
    curr = np.exp(log_eps) + np.exp(log_beta) / n_seen ** alpha
    slope = expnt * (curr - irred) / np.float32(n_seen)
    credit = (p_history * (1 - p_history)) ** 0.5 if superseded else p_history ** 0.5
    weighted = slope * empirical_dist * credit
    dist = ref_clip_min_probability(weighted / weighted.sum(), 1e-2)
    p = 0.9 * p_avg + 0.1 * dist
    p_avg = (1 - 1 / (itr + 1)) * p_avg + 1 / (itr + 1) * dist
    return p, p_avg, dist


ADO_PARAMS = np.array([[1.2, 0.7, 0.35], [2.0, 0.9, 0.5], [0.4, 1.1, 0.02], [1.6, 0.6, 0.25]])
ADO_PRIOR = np.array([0.4, 0.3, 0.2, 0.1])
ADO_H = np.array([0.62, 0.25, 0.03, 0.10])           # realised shares far from uniform


@pytest.mark.parametrize("credit", ["h", "h(1-h)"])
def test_ado_mixer_equals_the_reference_update_with_non_uniform_h(credit):
    """Three consecutive updates of the mixer against the transcription, from the same fitted params,
    prior, EMA of realised shares h and running average: p, rho and p_bar to 1e-12. The default credit
    is the reference's current sqrt(h); the two credits give clearly different mixtures here."""
    K, n = 4, 12_800.0
    mixer = ADOMixer(start_step=0, prior=ADO_PRIOR.tolist(), **({} if credit == "h" else {"credit": credit}))
    state = new_state(K)
    mixer.apply(Event.FIT_START, state)
    mixer.params = torch.tensor(ADO_PARAMS)
    mixer.history = torch.tensor(ADO_H)
    mixer.total = torch.tensor([6400, 3200, 1600, 1600])                # n: all samples seen, 12800
    p_avg = ADO_PRIOR.copy()
    for step in (100, 101, 102):
        state.step = step
        mixer.apply(Event.BEFORE_SAMPLE, state)
        p, p_avg, dist = ref_curr_dist(ADO_PARAMS, n, ADO_PRIOR, ADO_H, p_avg, step, superseded=credit != "h")
        np.testing.assert_allclose(state.domain_weights.numpy(), p, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mixer.rho.numpy(), dist, rtol=0, atol=1e-12)
        np.testing.assert_allclose(mixer.p_avg.numpy(), p_avg, rtol=0, atol=1e-12)
    _, _, current = ref_curr_dist(ADO_PARAMS, n, ADO_PRIOR, ADO_H, ADO_PRIOR, 100)
    _, _, old = ref_curr_dist(ADO_PARAMS, n, ADO_PRIOR, ADO_H, ADO_PRIOR, 100, superseded=True)
    assert np.abs(current - old).max() > 0.05                          # the test tells the two apart
    with pytest.raises(ValueError, match="credit"):
        ADOMixer(credit="sqrt")


def test_ado_flat_domain_drops_to_the_floor_and_steepest_gains():
    """The flat domain's own preference (before the floor) is far below 0.01, so it is the fit, not the
    floor, that puts it there; the floor then lifts it to exactly 0.01 / (sum after clipping). Between the
    learning domains rho_0 / rho_1 = (slope_0 / slope_1) sqrt(h_0 / h_1): the steepest gains, scaled by the
    credit term."""
    n = 16 * np.arange(1, 400, 10)
    rng = np.random.default_rng(0)
    curves = [power_law(n, 4.0, 0.7, 0.4), power_law(n, 3.0, 0.7, 0.3), 3.0 + 0.002 * rng.standard_normal(len(n))]
    params = torch.tensor(np.stack([fit_power_law(n, c, n_starts=12) for c in curves]))
    slope = params[:, 2].clamp(min=0.05) * torch.exp(params[:, 0]) / float(n[-1]) ** params[:, 2] / float(n[-1])
    prior = torch.full((3,), 1 / 3, dtype=torch.float64)
    h = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    raw = ado_preference(params, float(n[-1]), prior, h)
    assert raw[2] < 0.001                                                # far below the floor on its own
    assert float(raw[0] / raw[1]) == pytest.approx(float(slope[0] / slope[1] * (0.3 / 0.4) ** 0.5), rel=1e-12)
    rho = clip_min_probability(raw, 0.01)
    assert float(rho[2]) == pytest.approx(0.01 / (1 - float(raw[2]) + 0.01), rel=1e-12)
    assert slope.argmax() == 0 and rho.argmax() == 0 and rho[0] > prior[0]
    np.testing.assert_allclose(rho.numpy(), ref_clip_min_probability(raw.numpy(), 0.01), rtol=0, atol=1e-15)
    # the credit term counts: a domain drawn much less often (h 0.2 against 0.5) loses its lead
    assert ado_preference(params, float(n[-1]), prior, torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)).argmax() == 1
    # with the reference's clip: a deficit only where the input does not sum to 1
    torch.testing.assert_close(clip_min_probability(torch.tensor([0.999, 0.001, 0.0]), 0.01),
                               torch.tensor([0.999, 0.01, 0.01], dtype=torch.float64) / 1.019)
    np.testing.assert_allclose(clip_min_probability(torch.tensor([0.5, 0.2, 0.0]), 0.1).numpy(),
                               ref_clip_min_probability(np.array([0.5, 0.2, 0.0]), 0.1), atol=1e-15)


def drive_ado(mixer, curves, steps, batch=16, seed=0):
    """Training loss of domain k after n total samples: curves[k](n) + small noise."""
    K = len(curves)
    state = new_state(K, batch)
    mixer.apply(Event.FIT_START, state)
    g = torch.Generator().manual_seed(seed)
    seen, W = 0, []
    for step in range(steps):
        state.step, state.metrics = step, {}
        mixer.apply(Event.BEFORE_SAMPLE, state)
        W.append(state.domain_weights.clone())
        d = torch.multinomial(state.domain_weights, batch, replacement=True, generator=g)
        seen += batch
        means = torch.tensor([c(seen) for c in curves], dtype=torch.float64)
        state.batch_domains = d
        state.losses = (means[d] * (1 + 0.002 * torch.randn(batch, generator=g, dtype=torch.float64))).float()
        mixer.apply(Event.BATCH_END, state)
    return torch.stack(W), state


def test_ado_mixer_prefers_the_learnable_domain_and_floors_the_flat_one():
    curves = [lambda n: 2.0 + 30 * n ** -0.5, lambda n: 2.0 + 8 * n ** -0.3, lambda n: 4.0]
    mixer = ADOMixer(start_step=60, update_interval=40, window=31, subsample=5, n_starts=8, prior="uniform")
    W, state = drive_ado(mixer, curves, 120)
    torch.testing.assert_close(W[:60], torch.full((60, 3), 1 / 3, dtype=torch.float64))  # prior before start
    assert mixer.params is not None
    # the flat domain is at the floor because its fitted slope is ~0 (its own preference is far below
    # 0.01), and the mixer's rho is the reference's from the mixer's own fit, h and n
    raw = ado_preference(mixer.params, mixer.seen()[0], mixer.prior, mixer.history)
    assert raw[2] < 0.001 and not torch.allclose(mixer.history, torch.full((3,), 1 / 3, dtype=torch.float64))
    p, _, dist = ref_curr_dist(mixer.params.numpy(), float(mixer.seen()[0]), mixer.prior.numpy(),
                               mixer.history.numpy(), mixer.p_avg.numpy(), 120)
    state.step = 120
    mixer.apply(Event.BEFORE_SAMPLE, state)
    np.testing.assert_allclose(mixer.rho.numpy(), dist, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state.domain_weights.numpy(), p, rtol=0, atol=1e-12)
    assert W[-1][2] < 1 / 3 - 0.05 and W[-1][:2].min() > W[-1][2]
    assert {"ado/alpha/d0", "ado/eps/d0", "ado/beta/d0", "ado/rho/d2", "ado/h/d1"} <= set(state.metrics)
    # p_t = 0.9 p_bar + 0.1 rho: the smoothing keeps the prior's share large early on
    assert W[-1][2] > 0.01


def test_ado_state_dict_restores_exactly():
    curves = [lambda n: 2.0 + 30 * n ** -0.5, lambda n: 3.0]
    a = ADOMixer(start_step=30, update_interval=15, window=21, subsample=3, n_starts=2)
    _, state = drive_ado(a, curves, 40)
    b = ADOMixer(start_step=30, update_interval=15, window=21, subsample=3, n_starts=2)
    b.apply(Event.FIT_START, new_state(2))
    b.load_state_dict(roundtrip(a.state_dict()))
    for mixer in (a, b):
        state.step = 40
        mixer.apply(Event.BEFORE_SAMPLE, state)
        mixer.w = state.domain_weights.clone()
        state.batch_domains, state.losses = torch.tensor([0, 1, 1, 0]), torch.tensor([2.5, 3.0, 3.0, 2.4])
        state.step = 45
        mixer.apply(Event.BATCH_END, state)
    assert torch.equal(a.w, b.w) and torch.equal(a.params, b.params)


# -- Sheared-LLaMA (spec 7) ---------------------------------------------------------------------------

def test_sheared_update_formula_clipped_and_not():
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    loss = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    ref = torch.tensor([2.5, 2.5, 1.0], dtype=torch.float64)
    new, delta = sheared_update(alpha, loss, ref, clip=True, smoothing=0.0)
    torch.testing.assert_close(delta, torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    e = alpha * torch.exp(delta)
    torch.testing.assert_close(new, e / e.sum())
    new_u, delta_u = sheared_update(alpha, loss, ref, clip=False, smoothing=1e-4)
    e = alpha * torch.exp(torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(new_u, (1 - 1e-4) * e / e.sum() + 1e-4 / 3)
    assert new[0] > alpha[0] and new_u[0] > alpha[0]                   # furthest above its reference gains


def test_sheared_weights_stabilise_only_when_clipped():
    """Losses at or below their references: the clipped update stops; the unclipped one keeps moving
    weight towards the domain closest to (least below) its reference."""
    loss = torch.tensor([1.9, 2.5, 0.8], dtype=torch.float64)
    ref = torch.tensor([2.0, 2.5, 1.0], dtype=torch.float64)
    for clip in (True, False):
        alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
        for _ in range(20):
            alpha, _ = sheared_update(alpha, loss, ref, clip=clip, smoothing=0.0)
        if clip:
            torch.testing.assert_close(alpha, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
        else:
            assert alpha[1] > 0.75                                   # from 0.3, and still moving


def test_sheared_mixer_reads_a_run_summary_and_updates_at_evaluations(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"val_loss": {"a": 2.0, "b": 3.0, "c": 1.0}}))
    torch.testing.assert_close(read_reference(str(tmp_path), ["a", "c"]), torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"no reference loss for domain\(s\) \['z'\]"):
        read_reference(str(tmp_path), ["a", "z"])
    with pytest.raises(ValueError, match="exactly one"):
        ShearedMixer()
    mixer = ShearedMixer(reference=str(tmp_path), initial_weights="uniform", smoothing=0.0)
    state = DataState(["a", "b", "c"], [10, 10, 10], 4)
    mixer.apply(Event.FIT_START, state)
    mixer.apply(Event.BEFORE_SAMPLE, state)
    torch.testing.assert_close(state.domain_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    state.val_loss = {"a": 3.0, "b": 3.0, "c": 1.0}
    mixer.apply(Event.EVAL_END, state)                                  # the run's evaluation before training
    assert mixer.updates == 0
    mixer.apply(Event.BATCH_END, state)                                 # no evaluation: nothing moves
    assert mixer.updates == 0
    mixer.apply(Event.EVAL_END, state)
    state.metrics = {}
    mixer.apply(Event.BEFORE_SAMPLE, state)
    e = torch.tensor([math.e, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(state.domain_weights, e / e.sum())
    assert state.metrics["sheared/excess/a"] == 1.0
    fresh = ShearedMixer(reference_loss={"a": 2.0, "b": 3.0, "c": 1.0})
    fresh.apply(Event.FIT_START, state)
    fresh.load_state_dict(roundtrip(mixer.state_dict()))
    assert torch.equal(fresh.alpha, mixer.alpha) and fresh.updates == 1


def test_sheared_own_schedule_probes_validation_loss():
    model = tiny_gpt()
    data = synthetic_domains(n_per_domain=8)
    val = MixtureDataset(synthetic_domains(n_per_domain=6, seed=1))
    mixer = ShearedMixer(reference_loss={"A": 0.0, "B": 0.0, "C": 0.0}, update_every=2, val_samples=3,
                         initial_weights="uniform", smoothing=0.0)
    flex = DataFlex(data, 4, plugins=[mixer], interface=TorchInterface(model), datasets={"val": val})
    flex.evaluate(val)                        # as launch/train.py does, before the first step (and FIT_START)
    assert mixer.updates == 0
    for _ in range(2):
        batch = flex.next_batch()
        flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        flex.end_step()
    assert mixer.updates == 1
    expected = flex.state.signals.val_loss(max_per_domain=3)
    torch.testing.assert_close(mixer.delta, expected)
    first = val.batch(torch.tensor([0, 1, 2]))
    with torch.no_grad():
        from dataflex.core.loss import per_sample_loss
        la = per_sample_loss(model(first["input_ids"], position_ids=first["position_ids"]), first["labels"],
                             first["loss_mask"])
    assert expected[0].item() == pytest.approx(la.double().mean().item(), rel=1e-5)


# -- Aioli (spec 2) ----------------------------------------------------------------------------------

class SimSignals:
    """A simulator standing in for the model: L^{t+1} = L^t - A p_t + noise, where p_t is the mixture
    the step was drawn from; `val_loss` reads L (what probing the validation set would give)."""

    def __init__(self, A, L0, noise=0.0, seed=0):
        self.A, self.L, self.noise = A, L0.clone(), noise
        self.g = torch.Generator().manual_seed(seed)
        self.calls = 0

    def step(self, p):
        self.L = self.L - self.A @ p + self.noise * torch.randn(len(p), generator=self.g, dtype=torch.float64)

    def val_loss(self, max_per_domain=None):
        self.calls += 1
        return self.L.clone()


def run_aioli(mixer, A, steps, noise=0.0, K=None):
    K = K or A.shape[0]
    state = new_state(K)
    sim = SimSignals(A, torch.full((K,), 10.0, dtype=torch.float64), noise)
    state.signals = sim
    mixer.apply(Event.FIT_START, state)
    W, records = [], []
    for step in range(steps):
        state.step, state.metrics = step, {}
        mixer.apply(Event.BEFORE_SAMPLE, state)
        W.append(state.domain_weights.clone())
        sim.step(state.domain_weights)
        mixer.apply(Event.BATCH_END, state)
        records.append(dict(state.metrics))
    return torch.stack(W), records, sim


def test_aioli_learn_params_recovers_A_exactly_without_noise():
    A = torch.tensor([[0.05, 0.01, 0.00], [0.02, 0.08, 0.01], [0.00, 0.03, 0.04]], dtype=torch.float64)
    for f in (0.5, 0.75):
        mixer = AioliMixer(lp_rounds=2, lp_steps=3, one_hot_factor=f, update_steps=30, normalize=False, ema=None)
        W, records, sim = run_aioli(mixer, A, 18)
        # the learn phase ran the perturbed mixtures q^(j) as the step's sampling weights
        rows = aioli_mixtures(3, f)
        assert all(any(torch.allclose(w, r) for r in rows) for w in W)
        assert sorted(int(torch.argmax(w)) for w in W[::3]) == [0, 0, 1, 1, 2, 2]
        torch.testing.assert_close(mixer.A, 3 * A, rtol=1e-9, atol=1e-12)   # S steps per mixture: S * A
        assert sim.calls == 3 * 2 + 1
        assert records[17]["aioli/A/d1/d1"] == pytest.approx(0.24)


def test_aioli_recovers_A_up_to_noise_and_moves_mass_to_the_largest_column():
    A = torch.tensor([[0.05, 0.01, 0.03], [0.02, 0.08, 0.06], [0.00, 0.03, 0.09]], dtype=torch.float64)
    mixer = AioliMixer(lp_rounds=4, lp_steps=4, one_hot_factor=0.75, update_steps=60, eta=1.0, ema=None)
    W, records, _ = run_aioli(mixer, A, 60, noise=0.002)
    expected = aioli_normalize(A)
    assert (mixer.A - expected).abs().max() < 0.02
    p = W[-1]
    assert p.argmax() == 2 == A.sum(0).argmax()                          # column sums 0.07, 0.12, 0.18
    torch.testing.assert_close(p, aioli_eg_step(torch.full((3,), 1 / 3, dtype=torch.float64), mixer.A, 1.0))
    # the train part of the round uses p for every step
    assert all(torch.equal(w, p) for w in W[48:])


def test_aioli_pure_functions():
    W = aioli_mixtures(3, 0.5)
    torch.testing.assert_close(W, torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]],
                                               dtype=torch.float64))
    A = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(aioli_unmix(A @ W.T, 0.5), A)
    N = aioli_normalize(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    torch.testing.assert_close(N, torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64) / 6)
    p = aioli_eg_step(torch.tensor([0.5, 0.5], dtype=torch.float64), N, 2.0)
    e = torch.exp(2.0 * N.sum(0))
    torch.testing.assert_close(p, e / e.sum())


def test_aioli_identical_domains_stay_uniform_and_prior_stage():
    A = torch.full((3, 3), 0.02, dtype=torch.float64)
    mixer = AioliMixer(lp_rounds=2, lp_steps=2, update_steps=20, prior=[0.7, 0.2, 0.1], prior_steps=5, ema=0.5)
    W, records, _ = run_aioli(mixer, A, 45, noise=0.0)
    torch.testing.assert_close(W[:5], torch.tensor([[0.7, 0.2, 0.1]] * 5, dtype=torch.float64))
    assert records[0]["aioli/phase"] == 0 and records[5]["aioli/phase"] == 1 and records[17]["aioli/phase"] == 2
    torch.testing.assert_close(W[-1], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert mixer.rounds == 2


class SwitchingSignals(SimSignals):
    """The domains' interaction matrix changes at step `at`: each Aioli round estimates a different A."""

    def __init__(self, A, A_later, at, L0):
        super().__init__(A, L0)
        self.A_later, self.at, self.t = A_later, at, 0

    def step(self, p):
        if self.t == self.at:
            self.A = self.A_later
        self.t += 1
        super().step(p)


def test_aioli_ema_averages_the_rounds_estimates():
    """Two rounds that estimate different matrices A_1, A_2: after the second, A_bar = (1 - gamma) A_2 +
    gamma A_1 and p = EG from uniform on A_bar (neither A_2 alone, nor a step from the previous p)."""
    A1 = torch.tensor([[0.05, 0.01, 0.00], [0.02, 0.08, 0.01], [0.00, 0.03, 0.04]], dtype=torch.float64)
    A2 = torch.tensor([[0.01, 0.00, 0.06], [0.03, 0.02, 0.00], [0.00, 0.01, 0.09]], dtype=torch.float64)
    gamma, eta = 0.3, 2.0
    mixer = AioliMixer(eta=eta, lp_rounds=2, lp_steps=2, update_steps=20, ema=gamma)
    state = new_state(3)
    sim = SwitchingSignals(A1, A2, 20, torch.full((3,), 10.0, dtype=torch.float64))
    state.signals = sim
    mixer.apply(Event.FIT_START, state)
    estimates, p_after = [], []
    for step in range(40):
        state.step, state.metrics = step, {}
        mixer.apply(Event.BEFORE_SAMPLE, state)
        sim.step(state.domain_weights)
        mixer.apply(Event.BATCH_END, state)
        if step in (11, 31):                      # the learn phase of each round (K * rounds * steps = 12) ends
            estimates.append(mixer.A.clone())
            p_after.append(mixer.p.clone())
    first, second = estimates
    assert (first - second).abs().max() > 0.1                              # the rounds saw different domains
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(p_after[0], aioli_eg_step(uniform, first, eta))
    A_bar = (1 - gamma) * second + gamma * first
    torch.testing.assert_close(mixer.A_bar, A_bar)
    torch.testing.assert_close(p_after[1], aioli_eg_step(uniform, A_bar, eta))
    assert (p_after[1] - aioli_eg_step(uniform, second, eta)).abs().max() > 1e-3
    assert (p_after[1] - aioli_eg_step(p_after[0], second, eta)).abs().max() > 1e-3


def test_aioli_state_dict_restores_mid_round():
    A = torch.tensor([[0.05, 0.01], [0.02, 0.08]], dtype=torch.float64)
    full = AioliMixer(lp_rounds=2, lp_steps=2, update_steps=12, seed=5, ema=None)
    W_full, _, _ = run_aioli(full, A, 30)
    first = AioliMixer(lp_rounds=2, lp_steps=2, update_steps=12, seed=5, ema=None)
    run_aioli(first, A, 15)                          # stops inside the second round's LearnParams
    resumed = AioliMixer(lp_rounds=2, lp_steps=2, update_steps=12, seed=0, ema=None)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    # replay the simulator from the same losses: the same trajectory as the uninterrupted run
    state = new_state(2)
    sim = SimSignals(A, torch.full((2,), 10.0, dtype=torch.float64))
    for w in W_full[:15]:
        sim.step(w)
    state.signals = sim
    resumed.apply(Event.FIT_START, state)
    for step in range(15, 30):
        state.step = step
        resumed.apply(Event.BEFORE_SAMPLE, state)
        assert torch.equal(state.domain_weights, W_full[step])
        sim.step(state.domain_weights)
        resumed.apply(Event.BATCH_END, state)


def test_aioli_errors():
    with pytest.raises(ValueError, match="update_steps"):
        AioliMixer(lp_rounds=2, lp_steps=4, update_steps=20).apply(Event.FIT_START, new_state(3))
    with pytest.raises(ValueError, match="prior_steps needs prior"):
        AioliMixer(prior_steps=10)


# -- on the tiny LM (A periodic, B random tokens: unlearnable, C a learnable rule) ------------------

def train_lm(mixer, steps, batch=16, val=None, seed=0):
    torch.manual_seed(seed)
    model = tiny_gpt()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    flex = DataFlex(synthetic_domains(), global_batch_size=batch, plugins=[mixer], seed=seed,
                    interface=TorchInterface(model), datasets={"val": val} if val is not None else None)
    records = []
    for _ in range(steps):
        b = flex.next_batch()
        loss = flex.loss(model(b["input_ids"], position_ids=b["position_ids"]), b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        records.append(flex.end_step())
    return records, flex


def test_ado_does_not_chase_the_unlearnable_domain():
    """Spec 6(e)4: the bandit favours B (its loss stays highest); ADO's fitted slope for B is ~0."""
    mixer = ADOMixer(start_step=20, update_interval=20, window=21, subsample=2, n_starts=8, prior="uniform")
    records, _ = train_lm(mixer, 60)
    w = records[-1]["domain_weights"]
    assert mixer.params is not None
    assert w["B"] <= 1 / 3 + 0.01, w                   # at or below uniform (the bandit: > 0.36)
    assert records[-1]["ado/rho/B"] < records[-1]["ado/rho/C"]


def test_aioli_learn_params_on_the_lm_run_through_the_sampler():
    """f = 1: each LearnParams step trains on one domain only, visible in the ledger; the validation
    losses probed after each mixture give A, and p its EG step for the rest of the round."""
    val = MixtureDataset(synthetic_domains(n_per_domain=8, seed=1))
    mixer = AioliMixer(lp_rounds=1, lp_steps=3, one_hot_factor=1.0, update_steps=24, eta=1.0, ema=None,
                       val_samples=8)
    records, flex = train_lm(mixer, 24, val=val)
    order = mixer.order.tolist()
    for m, j in enumerate(order):
        for step in range(3 * m, 3 * m + 3):
            assert set(records[step]["ledger"]["domain"]) == {"ABC"[j]}
    assert mixer.A is not None and mixer.rounds == 1
    torch.testing.assert_close(mixer.p, aioli_eg_step(torch.full((3,), 1 / 3, dtype=torch.float64), mixer.A, 1.0))
    assert not torch.allclose(mixer.p, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert records[8]["aioli/A/A/A"] == pytest.approx(float(mixer.A[0, 0]))
    assert all(records[s]["domain_weights"] == records[-1]["domain_weights"] for s in range(9, 24))


def test_bandit_apply_loss_estimates_with_the_sampling_distribution():
    mixer = BanditMixer(variant="cumulative", apply="loss")
    state = new_state(3, sizes=[60, 30, 10])
    P, drawn = simulate_bandit(mixer, [1.0, 2.0, 4.0], 400)
    q = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    assert P[-1].argmax() == 2 and P[-1][2] > 0.8                     # the policy learns the best arm
    counts = torch.bincount(torch.cat(drawn[-100:]), minlength=3).double()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.05         # simulate_bandit's sizes are equal: q uniform
    # the estimate divides by q, the distribution the batch came from
    m = BanditMixer(apply="loss", estimator="count", alpha=0.0)
    m.apply(Event.FIT_START, state)
    assert state.domain_loss_weights is None
    m.apply(Event.BEFORE_SAMPLE, state)
    torch.testing.assert_close(state.domain_weights, q)                # the batch is drawn from q ...
    torch.testing.assert_close(m.mixture, m.policy)
    torch.testing.assert_close(state.domain_loss_weights, m.policy / q)  # ... and its losses scaled by pi / q
    state.batch_domains, state.losses = torch.tensor([0, 0, 1, 2]), torch.tensor([1.0, 1.0, 2.0, 4.0])
    m.apply(Event.BATCH_END, state)
    torch.testing.assert_close(m.reward_hat, torch.tensor([1.0 * 0.5 / 0.6, 2.0 * 0.25 / 0.3, 4.0 * 0.25 / 0.1],
                                                          dtype=torch.float64))


def test_every_mixer_config_instantiates():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "configs" / "mixer"
    names = sorted(p.stem for p in root.glob("*.yaml"))
    assert set(names) == set(MIXERS), (names, sorted(MIXERS))
    extra = {"sheared": {"reference_loss": {"A": 1.0}}, "doremi": {"reference": "unused"}}
    for name in names:
        cfg = OmegaConf.merge({"trainer": {"seed": 3}}, {"mixer": OmegaConf.load(root / f"{name}.yaml")},
                              {"mixer": extra.get(name, {})})
        mixer = instantiate(cfg.mixer)
        assert isinstance(mixer, MIXERS[name]) and mixer.apply_to in ("sample", "loss")
