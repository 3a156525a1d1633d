"""Loss-based sample reweighting (Sow et al., ICLR 2025; spec section 8)."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import leave_spawned_group, synthetic_domains, tiny_gpt

from dataflex.core.events import Event
from dataflex.core.state import DataState
from dataflex.grad.interface import TorchInterface
from dataflex.reweighters import (
    REWEIGHTERS,
    STRATEGIES,
    AnchorReweighter,
    FocalReweighter,
    LossReweighter,
    Rho1Reweighter,
    TiltedReweighter,
    loss_weights,
    normalise_losses,
)
from dataflex.session.flex import DataFlex


def spec_weights(losses, strategy, r):
    """Straight from the spec's formulas, in float64."""
    l = losses.double()
    lo, hi = l.min(), l.max()
    x = (2 * l - (hi + lo)) / max(float(hi - lo), 1e-6)
    f = {"linupper": torch.clamp(x + 1, max=1.0), "quadratic": 1 - x ** 2, "extremes": x.abs(),
         "upper": 0.5 * x + 0.5}[strategy]
    e = torch.exp((f - f.max()) / r)
    return e / e.sum()


LOSSES = torch.linspace(0.0, 10.0, 21)


def test_normalise_losses_maps_to_unit_interval():
    x = normalise_losses(torch.tensor([3.0, 5.0, 4.0, 7.0]))
    torch.testing.assert_close(x, torch.tensor([-1.0, 0.0, -0.5, 1.0]))
    assert torch.equal(normalise_losses(torch.full((4,), 2.5)), torch.zeros(4))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("r", [0.1, 0.4, 1.0])
def test_weights_match_the_spec_formula(strategy, r):
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(37, generator=g) * 4 + 1
    w = loss_weights(losses, strategy, r)
    torch.testing.assert_close(w, spec_weights(losses, strategy, r), rtol=1e-12, atol=1e-15)
    assert w.dtype == torch.float64
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-12)
    # only the ranks within the batch's range matter: affine maps of the losses leave weights unchanged
    torch.testing.assert_close(loss_weights(3 * losses.double() + 7, strategy, r), w, rtol=1e-9, atol=1e-12)


def test_linupper_shape():
    w = loss_weights(LOSSES, "linupper", 0.4)
    assert (w[1:] - w[:-1] >= -1e-15).all()                 # monotone non-decreasing
    assert (w[10:] == w[10]).all()                          # flat on the upper half (x >= 0)
    assert (w[1:11] > w[:10]).all()                         # strictly increasing on the lower half
    assert (w[-1] / w[0]).item() == pytest.approx(math.exp(1 / 0.4), rel=1e-9)


def test_quadratic_peaks_in_the_middle():
    w = loss_weights(LOSSES, "quadratic", 0.4)
    assert w.argmax().item() == 10
    torch.testing.assert_close(w, w.flip(0))
    assert (w[1:11] > w[:10]).all() and (w[11:] < w[10:20]).all()


def test_extremes_is_u_shaped():
    w = loss_weights(LOSSES, "extremes", 0.4)
    assert w.argmin().item() == 10
    torch.testing.assert_close(w, w.flip(0))
    assert (w[1:11] < w[:10]).all() and (w[11:] > w[10:20]).all()
    assert w[0] == w.max()


def test_upper_is_strictly_increasing():
    w = loss_weights(LOSSES, "upper", 0.4)
    assert (w[1:] > w[:-1]).all()


def test_temperature_limits():
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(50, generator=g) * 3
    for s in STRATEGIES:
        w = loss_weights(losses, s, 1e7)
        assert (w - 1 / 50).abs().max() < 1e-8
    # small temperature: all the mass on the largest f
    w = loss_weights(losses, "upper", 1e-3)
    assert w[losses.argmax()].item() > 0.99
    # equal losses: uniform, never NaN
    torch.testing.assert_close(loss_weights(torch.full((8,), 2.0), "linupper", 0.4),
                               torch.full((8,), 1 / 8, dtype=torch.float64))


def test_errors_list_choices():
    with pytest.raises(ValueError, match="available: linupper, quadratic, extremes, upper"):
        loss_weights(LOSSES, "mid")
    with pytest.raises(ValueError, match="available"):
        LossReweighter(strategy="mid")
    with pytest.raises(ValueError, match="temperature must be positive"):
        LossReweighter(temperature=0)
    with pytest.raises(ValueError, match=r"unknown reweighter 'nope'; available reweighters: anchor, focal, loss, rho1, tilted"):
        REWEIGHTERS.build("nope")


def test_reweighter_plugin_mean_one_and_burnout():
    rw = LossReweighter(strategy="linupper", temperature=0.4, burnout_steps=2)
    state = DataState(["a"], [10], 6)
    state.losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    for step in range(2):
        state.step = step
        rw.apply(Event.AFTER_LOSS, state)
        assert torch.equal(state.sample_weights, torch.ones(6, dtype=torch.float64))
        assert state.metrics["reweighter/weight_std"] == 0.0
    state.step = 2
    rw.apply(Event.AFTER_LOSS, state)
    torch.testing.assert_close(state.sample_weights, 6 * spec_weights(state.losses, "linupper", 0.4))
    assert state.sample_weights.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert state.metrics["reweighter/weight_max"] == pytest.approx(float(state.sample_weights.max()))


# -- noisy linear regression (spec 8(e)3) ---------------------------------------------------------

def regression_run(strategy, seed, steps=150, lr=0.05, B=32, d=20, informative=0.1, noise=0.1, r=0.4):
    """Test loss curve of minibatch SGD on y = x.w* + noise.

    As in the paper's toy, most training samples are redundant: 90% only excite two high-variance
    directions, learnt within a few steps, after which they have low loss and carry no new
    information; 10% are isotropic and informative. The test distribution is isotropic, so
    test loss = ||w - w*||^2. Same learning rate, batches and data for every strategy."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    N = 4000
    k = int(N * informative)
    X = torch.zeros(N, d, dtype=torch.float64)
    X[:k] = torch.randn(k, d, generator=g, dtype=torch.float64)
    X[k:, :2] = 2 * torch.randn(N - k, 2, generator=g, dtype=torch.float64)
    y = X @ w_star + noise * torch.randn(N, generator=g, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64)
    batches = torch.Generator().manual_seed(1000 + seed)
    curve = []
    for _ in range(steps):
        idx = torch.randint(0, N, (B,), generator=batches)
        residual = X[idx] @ w - y[idx]
        per_sample = 0.5 * residual ** 2
        weights = torch.ones(B, dtype=torch.float64) if strategy == "uniform" else B * loss_weights(per_sample, strategy, r)
        w = w - lr * (weights * residual) @ X[idx] / B     # gradient of mean_i(w_i * l_i)
        curve.append(float(((w - w_star) ** 2).sum()))
    return torch.tensor(curve)


def test_linupper_beats_uniform_on_noisy_linear_regression():
    seeds = range(5)
    curves = {s: torch.stack([regression_run(s, seed) for seed in seeds]) for s in ("uniform", "linupper", "quadratic")}
    uni, lin, quad = (curves[s].mean(0) for s in ("uniform", "linupper", "quadratic"))
    # faster: ahead at every checkpoint after the first few steps, and by a wide margin at the end
    for t in (24, 49, 99, 149):
        assert lin[t] < uni[t], (t, lin[t], uni[t])
    assert lin[-1] < 0.1 * uni[-1]
    assert (curves["linupper"][:, -1] < curves["uniform"][:, -1]).all()   # on every seed
    assert quad[-1] < uni[-1]                                               # the paper's second finding
    assert (torch.isfinite(curves["linupper"])).all()


# -- DDP vs single process (spec 8(e)4) -----------------------------------------------------------

STEPS, GLOBAL_B = 3, 8


def loop_logits(model, batch):
    """Logits computed one sample at a time, so per-sample losses are bit-identical whatever batch
    a sample shares; the comparison then isolates the gather / weigh / slice path."""
    return torch.cat([model(batch["input_ids"][i:i + 1], position_ids=batch["position_ids"][i:i + 1])
                      for i in range(batch["input_ids"].shape[0])])


def make_reweighter(name):
    """Every reweighter, set to act from the first step (Rho-1's reference: another seeded tiny GPT)."""
    return {"loss": lambda: LossReweighter(burnout_steps=0),
            "tilted": lambda: TiltedReweighter(t=0.5),
            "focal": lambda: FocalReweighter(gamma=2.0),
            "rho1": lambda: Rho1Reweighter(reference=tiny_gpt(seed=1), keep_fraction=0.6),
            "anchor": lambda: AnchorReweighter(anchor="C", anchor_samples=4, refresh_every=2)}[name]()


def make_flex(name, **kwargs):
    model = tiny_gpt()
    return DataFlex(synthetic_domains(n_per_domain=16), global_batch_size=GLOBAL_B, plugins=[make_reweighter(name)],
                    interface=TorchInterface(model), seed=3, **kwargs), model


def run_flex(flex, model):
    out = []
    for _ in range(STEPS):
        batch = flex.next_batch()
        model.zero_grad()
        loss = flex.loss(loop_logits(model, batch), batch)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        record = flex.end_step()
        tw = flex.state.token_weights
        out.append({"batch_ids": flex.state.batch_ids.clone(), "losses": flex.state.losses.clone(),
                    "weights": flex._weights.clone(), "local_weights": flex.loss.last["weight"].clone(),
                    "token_weights": None if tw is None else tw.clone(),
                    "sample_id": flex.loss.last["sample_id"].clone(), "grad": grad, "loss": loss.detach(),
                    "ledger": record["ledger"]})
    return out


def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for name in REWEIGHTERS:
            flex, model = make_flex(name)
            assert flex.world_size == world_size and flex.rank == rank
            out = run_flex(flex, model)
            for o in out:  # what DDP does to gradients: average over ranks
                dist.all_reduce(o["grad"])
                o["grad"] /= world_size
            results[name] = out
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_spawned_group()


def test_ddp_and_single_process_give_identical_weights(tmp_path):
    """Every reweighter, on two gloo ranks and in one process: the same weights on every rank, and
    the ranks' averaged gradient equals the single-process gradient."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    everything = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in REWEIGHTERS:
        check_ranks_match_single(name, [e[name] for e in everything])


def check_ranks_match_single(name, ranks):
    single = run_flex(*make_flex(name, rank=0, world_size=1))
    half = GLOBAL_B // 2
    for step in range(STEPS):
        ref = single[step]
        if ref["token_weights"] is None:    # reweighting is on
            assert not torch.equal(ref["weights"], torch.ones(GLOBAL_B, dtype=torch.float64)), name
        else:
            assert ref["token_weights"].std() > 0, name
        for r, res in enumerate(ranks):
            got = res[step]
            if ref["token_weights"] is not None:
                assert torch.equal(got["token_weights"], ref["token_weights"]), name
            assert torch.equal(got["batch_ids"], ref["batch_ids"])
            assert torch.equal(got["losses"], ref["losses"])           # gathered in rank order
            assert torch.equal(got["weights"], ref["weights"])         # identical weights on every rank
            assert torch.equal(got["sample_id"], ref["batch_ids"][r * half:(r + 1) * half])
            torch.testing.assert_close(got["local_weights"], ref["weights"][r * half:(r + 1) * half],
                                       rtol=1e-12, atol=0)
            assert {k: v for k, v in got["ledger"].items() if k != "rank"} == \
                {k: v for k, v in ref["ledger"].items() if k != "rank"}
            assert got["ledger"]["rank"] == [0] * half + [1] * half
            # DDP's gradient average of the local weighted means equals the single-process gradient
            torch.testing.assert_close(got["grad"], ref["grad"], rtol=1e-5, atol=1e-7)
        # local scalars are means over half the batch: their average is the global weighted mean
        torch.testing.assert_close((ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2, ref["loss"],
                                   rtol=1e-6, atol=0)
