"""Mixers: the ODM EXP3 bandit (spec section 3: paper and count-weighted estimators) and the static mixture."""
import io
import math

import pytest
import torch
from conftest import VOCAB, synthetic_domains, tiny_gpt

from dataflex.core.events import Event
from dataflex.core.state import DataState
from dataflex.mixers import (
    MIXERS,
    BanditMixer,
    StaticMixer,
    exp3_estimate,
    exp3_policy,
    exp3_update,
    exploration_rate,
)
from dataflex.mixers.static import resolve_weights
from dataflex.session.flex import DataFlex

# -- exact formulas ---------------------------------------------------------------------------

def test_exploration_rate_formula():
    assert exploration_rate(1, 4) == 0.25                       # sqrt(ln4/4) = 0.59 > 1/4
    assert exploration_rate(0, 4) == exploration_rate(1, 4)     # t = 0 is treated as t = 1
    assert exploration_rate(100, 4) == pytest.approx(math.sqrt(math.log(4) / 400), rel=1e-12)
    assert exploration_rate(1000, 3) == pytest.approx(math.sqrt(math.log(3) / 3000), rel=1e-12)
    # 1/K binds exactly while t <= K ln K
    assert exploration_rate(3, 3) == pytest.approx(1 / 3) and exploration_rate(4, 3) < 1 / 3
    rates = [exploration_rate(t, 5) for t in range(1, 200)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_exp3_policy_formula():
    r = torch.tensor([1.0, 2.0, 3.0, -1.0], dtype=torch.float64)
    pi = exp3_policy(r, eps_prev=0.2, eps=0.1)
    e = torch.exp(0.2 * r)
    torch.testing.assert_close(pi, (1 - 4 * 0.1) * e / e.sum() + 0.1, rtol=1e-12, atol=0)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)
    # eps = 1/K: exactly uniform whatever the rewards
    torch.testing.assert_close(exp3_policy(r * 100, 1.0, 0.25), torch.full((4,), 0.25, dtype=torch.float64))
    # the highest reward estimate gets the highest probability
    assert pi.argmax().item() == 2 and pi.argmin().item() == 3


def test_exp3_update_paper_and_cumulative():
    r_hat = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    rewards = torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64)
    counts = torch.tensor([3, 0, 1])
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    est, mask = exp3_estimate(rewards, counts, pi, "paper")
    paper = exp3_update(r_hat, est, mask, alpha=0.9)
    torch.testing.assert_close(paper, torch.tensor([0.9 * 1 + 0.1 * 4 / 0.5, 2.0, 0.9 * 3 + 0.1 * 2 / 0.2],
                                                   dtype=torch.float64), rtol=1e-12, atol=0)
    cum = exp3_update(r_hat, est, mask, variant="cumulative")
    torch.testing.assert_close(cum, torch.tensor([1 + 4 / 0.5, 2.0, 3 + 2 / 0.2], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # count-weighted: R_i * (n_i / B) / pi_i for every domain, 0 for an absent one
    est, mask = exp3_estimate(rewards, counts, pi, "count")
    torch.testing.assert_close(est, torch.tensor([4 * 0.75 / 0.5, 0.0, 2 * 0.25 / 0.2], dtype=torch.float64))
    assert mask.all()
    torch.testing.assert_close(exp3_update(r_hat, est, mask, alpha=0.9),
                               torch.tensor([0.9 + 0.1 * 6, 1.8, 0.9 * 3 + 0.1 * 2.5], dtype=torch.float64))
    assert torch.equal(r_hat, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # not modified in place
    with pytest.raises(ValueError, match="variant"):
        exp3_update(r_hat, est, mask, variant="nope")
    with pytest.raises(ValueError, match="variant"):
        BanditMixer(variant="smoothed")
    with pytest.raises(ValueError, match="estimator"):
        exp3_estimate(rewards, counts, pi, "mean")
    with pytest.raises(ValueError, match="renamed `prob_floor`"):
        BanditMixer(min_prob=0.03)


def test_prob_floor_floor_is_applied_and_normalised():
    raw = exp3_policy(torch.tensor([0.0, 0.0, 100.0], dtype=torch.float64), eps_prev=0.1, eps=0.01)
    assert raw[0] < 0.02
    floored = exp3_policy(torch.tensor([0.0, 0.0, 100.0], dtype=torch.float64), eps_prev=0.1, eps=0.01,
                          prob_floor=0.03)
    assert floored.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (floored[:2] > raw[:2]).all() and floored[2] < raw[2]
    # inactive when nothing is below the floor
    p = exp3_policy(torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64), 0.3, 0.2, prob_floor=0.03)
    torch.testing.assert_close(p, exp3_policy(torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64), 0.3, 0.2))


def test_prob_floor_is_a_true_floor():
    pi = exp3_policy(torch.tensor([0.0, 0.0, 100.0], dtype=torch.float64), eps_prev=0.1, eps=0.01,
                     prob_floor=0.03)
    assert pi.min().item() >= 0.03 - 1e-12
    assert abs(pi.sum().item() - 1) < 1e-12 and pi[2] == pi.max()


# -- the mixer in a simulated loop ------------------------------------------------------------

def simulate(mixer, means, steps, batch=16, seed=0, noise=0.1, state=None, gen=None):
    """Fixed per-domain loss levels; each step draws the batch's domains from the mixer's policy."""
    K = len(means)
    means = torch.tensor(means, dtype=torch.float64)
    if state is None:
        state = DataState([f"d{i}" for i in range(K)], [100] * K, batch)
        mixer.apply(Event.FIT_START, state)
    g = gen if gen is not None else torch.Generator().manual_seed(seed)
    hist = []
    for _ in range(steps):
        state.metrics = {}
        mixer.apply(Event.BEFORE_SAMPLE, state)
        pi, t = mixer.policy.clone(), mixer.t
        d = torch.multinomial(state.domain_weights, batch, replacement=True, generator=g)
        state.batch_domains = d
        state.losses = (means[d] + noise * torch.randn(batch, generator=g, dtype=torch.float64)).float()
        mixer.apply(Event.BATCH_END, state)
        hist.append((pi, t))
        state.step += 1
    return hist, state, g


@pytest.mark.parametrize("estimator", ["count", "paper"])
@pytest.mark.parametrize("means", [[2.0, 4.0, 3.0], [1.0, 1.5, 1.2, 1.1]])
def test_bandit_upweights_the_highest_loss_domain(means, estimator):
    hist, _, _ = simulate(BanditMixer(estimator=estimator), means, 200)
    final = hist[-1][0]
    K = len(means)
    top = max(range(K), key=lambda i: means[i])
    assert final.argmax().item() == top
    assert final[top] > 1 / K + (0.005 if estimator == "paper" else 0.002)
    # the whole ranking follows the losses
    assert torch.argsort(final).tolist() == sorted(range(K), key=lambda i: means[i])


@pytest.mark.parametrize("estimator,tol", [("paper", 0.01), ("count", 0.02)])
def test_equal_losses_keep_the_policy_uniform(estimator, tol):
    # the count estimator's n_i / B is noisier than the paper's R / pi (constant under equal losses)
    hist, _, _ = simulate(BanditMixer(estimator=estimator), [3.0, 3.0, 3.0], 200)
    P = torch.stack([p for p, _ in hist])
    assert (P - 1 / 3).abs().max() < tol
    assert (P[-50:].mean(0) - 1 / 3).abs().max() < tol / 2


@pytest.mark.parametrize("variant,min_prob", [("paper", 0.0), ("cumulative", 0.0), ("cumulative", 0.1)])
def test_policy_never_below_exploration_rate(variant, min_prob):
    mixer = BanditMixer(variant=variant, reward_scale=5.0, prob_floor=min_prob)
    hist, _, _ = simulate(mixer, [0.1, 8.0, 0.1], 150)
    gaps = []
    for pi, t in hist:
        eps = exploration_rate(t, 3)
        assert pi.min().item() >= eps - 1e-12
        assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)
        gaps.append(pi.min().item() - eps)
    if variant == "cumulative" and min_prob == 0:
        assert gaps[-1] < 1e-6  # the floor is what holds the starved domains up
    if min_prob:
        assert gaps[-1] > 0.02  # min_prob lifts the starved domains above eps_t


def test_rarely_sampled_domain_jumps_when_sampled():
    mixer = BanditMixer(alpha=0.9, estimator="paper")
    state = DataState(["a", "b", "c"], [10, 10, 10], 8)
    mixer.apply(Event.FIT_START, state)
    mixer.t = 50
    mixer.reward_hat = torch.tensor([40.0, 40.0, 0.0], dtype=torch.float64)
    mixer.apply(Event.BEFORE_SAMPLE, state)
    pi = state.domain_weights.clone()
    assert pi[2] < 0.1
    state.batch_domains = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2])
    state.losses = torch.full((8,), 3.0)
    mixer.apply(Event.BATCH_END, state)
    new = mixer.reward_hat
    assert new[2].item() == pytest.approx(0.1 * 3.0 / pi[2].item(), rel=1e-12)
    assert new[0].item() == pytest.approx(0.9 * 40 + 0.1 * 3.0 / pi[0].item(), rel=1e-12)
    assert new[1].item() == 40.0  # absent: unchanged
    # the rare domain's jump is its reward times 1/pi: far more than the unweighted reward
    assert new[2] > 3.0 and new[2] - 0.0 > (0.1 * 3.0) * 10
    assert mixer.t == 51
    assert state.metrics["bandit/reward_hat/c"] == pytest.approx(new[2].item())


def test_rewards_are_per_domain_means_times_scale():
    for estimator, share in (("paper", [1.0, 1.0]), ("count", [0.75, 0.25])):
        mixer = BanditMixer(alpha=0.5, reward_scale=15.0, estimator=estimator)
        state = DataState(["a", "b"], [10, 10], 4)
        mixer.apply(Event.FIT_START, state)
        mixer.apply(Event.BEFORE_SAMPLE, state)
        state.batch_domains = torch.tensor([0, 1, 0, 0])
        state.losses = torch.tensor([1.0, 2.0, 3.0, 5.0])
        mixer.apply(Event.BATCH_END, state)
        torch.testing.assert_close(mixer.reward_hat, torch.tensor(
            [0.5 * 15 * 3.0 * share[0] / 0.5, 0.5 * 15 * 2.0 * share[1] / 0.5], dtype=torch.float64))


def test_warmup_uses_initial_weights_and_learns_nothing():
    mixer = BanditMixer(warmup_steps=3, initial_weights=[6, 3, 1])
    state = DataState(["a", "b", "c"], [10, 20, 30], 8)
    mixer.apply(Event.FIT_START, state)
    for step in range(3):
        state.step, state.metrics = step, {}
        mixer.apply(Event.BEFORE_SAMPLE, state)
        torch.testing.assert_close(state.domain_weights, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
        state.batch_domains, state.losses = torch.tensor([0, 1, 2, 2]), torch.tensor([1.0, 5.0, 2.0, 2.0])
        mixer.apply(Event.BATCH_END, state)
        assert mixer.t == 1 and not mixer.reward_hat.any() and state.metrics == {}
    state.step = 3
    mixer.apply(Event.BEFORE_SAMPLE, state)
    torch.testing.assert_close(state.domain_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    mixer.apply(Event.BATCH_END, state)
    assert mixer.t == 2 and mixer.reward_hat[1] > 0
    # "size" initial weights come from the domain sizes
    sized = BanditMixer(warmup_steps=1, initial_weights="size")
    s2 = DataState(["a", "b", "c"], [10, 20, 30], 8)
    sized.apply(Event.FIT_START, s2)
    sized.apply(Event.BEFORE_SAMPLE, s2)
    torch.testing.assert_close(s2.domain_weights, torch.tensor([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))


def test_bandit_state_dict_round_trip_reproduces_future_weights():
    mixer = BanditMixer(alpha=0.7, reward_scale=2.0)
    _, state, gen = simulate(mixer, [1.0, 2.5, 1.5], 12, seed=4)
    buf = io.BytesIO()
    torch.save({"mixer": mixer.state_dict(), "gen": gen.get_state(), "step": state.step}, buf)
    hist_a, _, _ = simulate(mixer, [1.0, 2.5, 1.5], 15, state=state, gen=gen)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh = BanditMixer(alpha=0.7, reward_scale=2.0)
    state_b = DataState([f"d{i}" for i in range(3)], [100] * 3, 16, step=saved["step"])
    fresh.apply(Event.FIT_START, state_b)
    fresh.load_state_dict(saved["mixer"])
    gen_b = torch.Generator()
    gen_b.set_state(saved["gen"])
    hist_b, _, _ = simulate(fresh, [1.0, 2.5, 1.5], 15, state=state_b, gen=gen_b)
    for (pa, ta), (pb, tb) in zip(hist_a, hist_b):
        assert ta == tb and torch.equal(pa, pb)
    assert not torch.equal(hist_a[0][0], hist_a[-1][0])  # the weights did move


def test_bandit_end_to_end_favours_the_unlearnable_domain():
    """Spec 3(e)1: A periodic (easy), B random tokens (unlearnable), C learnable rule; ODM favours B."""
    model = tiny_gpt()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    flex = DataFlex(synthetic_domains(), global_batch_size=24, plugins=[BanditMixer()], seed=0)
    for _ in range(60):
        batch = flex.next_batch()
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        record = flex.end_step()
    w, dl = record["domain_weights"], record["domain_loss"]
    assert max(w, key=w.get) == "B", (w, dl)
    assert w["B"] > 0.36
    assert dl["B"] > dl["C"] > dl["A"]  # the premise: B's loss stays highest
    assert sum(w.values()) == pytest.approx(1.0)


# -- static -----------------------------------------------------------------------------------

def test_static_resolve_weights():
    names, sizes = ["a", "b", "c"], [10, 30, 60]
    torch.testing.assert_close(resolve_weights("uniform", names, sizes), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(resolve_weights("size", names, sizes),
                               torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    torch.testing.assert_close(resolve_weights({"a": 1, "c": 3}, names, sizes),
                               torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    torch.testing.assert_close(resolve_weights([2, 2, 4], names, sizes),
                               torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['zz'\]; domains are \['a', 'b', 'c'\]"):
        resolve_weights({"a": 1, "zz": 2}, names, sizes)
    with pytest.raises(ValueError, match="3 domains"):
        resolve_weights([1, 2], names, sizes)
    with pytest.raises(ValueError, match="'uniform', 'size'"):
        resolve_weights("sized", names, sizes)
    with pytest.raises(ValueError, match="non-negative"):
        resolve_weights([1, -1, 1], names, sizes)
    with pytest.raises(ValueError, match="positive sum"):
        resolve_weights({"a": 0}, names, sizes)


def test_static_mixer_drives_the_sampler():
    flex = DataFlex(synthetic_domains(n_per_domain=8), global_batch_size=40,
                    plugins=[MIXERS.build("static", weights={"A": 1, "C": 1})])
    doms = set()
    for _ in range(5):
        batch = flex.next_batch()
        torch.testing.assert_close(flex.state.domain_weights, torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
        doms |= set(flex.state.batch_domains.tolist())
        flex.loss(torch.zeros(*batch["input_ids"].shape, VOCAB), batch)
        flex.end_step()
    assert doms == {0, 2}
    # without a mixer the sampler starts from the domain sizes
    sized = DataFlex({"x": synthetic_domains(n_per_domain=8)["A"], "y": synthetic_domains(n_per_domain=24)["B"]},
                     global_batch_size=4)
    sized.next_batch()
    torch.testing.assert_close(sized.state.domain_weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    uniform = StaticMixer()
    st = DataState(["a", "b"], [1, 3], 2)
    uniform.apply(Event.FIT_START, st)
    uniform.apply(Event.BEFORE_SAMPLE, st)
    torch.testing.assert_close(st.domain_weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
