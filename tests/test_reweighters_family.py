"""Tilted, focal, Rho-1 and anchor reweighters (spec section 8), non-finite losses, composition of
the three families in one loss, and the token-mean reduction against a plain loop."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_domains, tiny_gpt

from dataflex.core.events import Event
from dataflex.core.state import DataState
from dataflex.grad.interface import TorchInterface
from dataflex.mixers import StaticMixer
from dataflex.reweighters import (
    REWEIGHTERS,
    AnchorReweighter,
    LossReweighter,
    Rho1Reweighter,
    TiltedReweighter,
    anchor_weights,
    annealed_temperature,
    focal_weights,
    rho1_token_weights,
    tilted_weights,
)
from dataflex.selectors import LossSelector
from dataflex.session.flex import DataFlex

LOSSES = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 9.0, 12.0], dtype=torch.float64)   # two planted outliers


# -- tilted ERM -----------------------------------------------------------------------------------

def test_tilted_weights_formula_and_limits():
    for t in (-2.0, -0.5, 0.5, 2.0):
        w = tilted_weights(LOSSES, t)
        e = torch.exp(t * LOSSES)
        torch.testing.assert_close(w, e / e.sum())
        assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(tilted_weights(LOSSES, 0.0), torch.full((8,), 1 / 8, dtype=torch.float64))
    assert tilted_weights(LOSSES, 1e-6).std() < 1e-5          # t -> 0 (temperature 1/t -> inf): uniform
    assert tilted_weights(LOSSES, 50.0)[-1] > 0.999           # t -> inf: the max loss alone


def test_tilted_positive_t_favours_hard_samples_negative_t_suppresses_outliers():
    up, down = tilted_weights(LOSSES, 1.0), tilted_weights(LOSSES, -1.0)
    assert torch.all(up[1:] > up[:-1])                        # monotone increasing in the loss
    assert up[-2:].sum() > 0.9                                # the outliers take the batch
    assert torch.all(down[1:] < down[:-1])
    assert down[-2:].sum() < 1e-3                             # the outliers are suppressed
    # a robust mean: the tilted (t < 0) weighted mean stays near the clean losses, the plain mean does not
    clean = LOSSES[:-2].mean()
    mild = tilted_weights(LOSSES, -0.3)
    assert abs(float((mild * LOSSES).sum() - clean)) < abs(float(LOSSES.mean() - clean)) / 10


# -- focal ------------------------------------------------------------------------------------------

def test_focal_token_weights():
    tok = torch.tensor([[0.01, 0.7, 3.0], [0.0, 5.0, 0.2]])
    w = focal_weights(tok, 2.0)
    p = torch.exp(-tok.double())
    torch.testing.assert_close(w, (1 - p) ** 2)
    assert (w >= 0).all() and (w <= 1).all()
    assert torch.equal(focal_weights(tok, 0.0), torch.ones(2, 3, dtype=torch.float64))   # gamma 0: plain loss
    flat = w.flatten()[torch.argsort(tok.flatten())]
    assert torch.all(flat[1:] >= flat[:-1])                   # harder tokens never weigh less


# -- Rho-1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.1, 0.35, 0.6, 0.7, 1.0])
def test_rho1_keeps_exactly_k_percent_of_label_tokens_by_excess_loss(k):
    g = torch.Generator().manual_seed(0)
    tok, ref = torch.rand(6, 10, generator=g) * 4, torch.rand(6, 10, generator=g) * 4
    mask = (torch.rand(6, 10, generator=g) > 0.3).float()
    w = rho1_token_weights(tok, ref, mask, k)
    n = int(mask.sum())
    assert int(w.sum()) == round(k * n)
    assert (w[mask == 0] == 0).all()
    excess = (tok - ref)[mask > 0]
    kept = excess[w[mask > 0] > 0]
    dropped = excess[w[mask > 0] == 0]
    if len(dropped) and len(kept):
        assert kept.min() >= dropped.max()                    # the kept ones are the top ones


def test_rho1_plugin_probes_the_reference_on_the_batch_tokens():
    model, ref_model = tiny_gpt(), tiny_gpt(seed=1)
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, [Rho1Reweighter(reference=ref_model, keep_fraction=0.6)],
                    interface=TorchInterface(model), seed=0)
    batch = flex.next_batch()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = flex.loss(logits, batch)
    s = flex.state
    with torch.no_grad():
        ref_tok = F.cross_entropy(ref_model(batch["input_ids"]).transpose(1, 2), batch["labels"], reduction="none")
    expected_w = rho1_token_weights(s.token_losses, ref_tok * batch["loss_mask"], batch["loss_mask"], 0.6)
    assert torch.equal(s.token_weights, expected_w)
    tok = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    expected = (tok * expected_w).sum() / expected_w.sum()   # the mean over the kept tokens
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=0)
    rec = flex.end_step()
    assert rec["reweighter/kept_fraction"] == pytest.approx(round(0.6 * batch["loss_mask"].sum().item())
                                                            / batch["loss_mask"].sum().item())
    with pytest.raises(ValueError, match="reference model"):
        Rho1Reweighter()


# -- anchor -----------------------------------------------------------------------------------------

def test_anchor_weights_follow_similarity_and_temperature():
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(5, 8, generator=g) + torch.tensor([4.0] + [0.0] * 7)
    near = anchors.mean(0, keepdim=True) + 0.1 * torch.randn(3, 8, generator=g)
    far = -anchors.mean(0, keepdim=True) + 0.1 * torch.randn(3, 8, generator=g)
    w = anchor_weights(torch.cat([near, far]), anchors, 0.1)
    assert w.sum().item() == pytest.approx(1.0) and (w >= 0).all()
    assert w[:3].min() > 100 * w[3:].max()
    assert anchor_weights(torch.cat([near, far]), anchors, 1e6).std() < 1e-6    # temperature -> inf: uniform


def test_anchor_plugin_upweights_the_anchor_domain_and_refreshes():
    model = tiny_gpt()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    domains = synthetic_domains(n_per_domain=32)
    rw = AnchorReweighter(anchor="A", anchor_samples=8, temperature=0.05, refresh_every=3)
    flex = DataFlex(domains, 24, [rw], interface=TorchInterface(model), seed=0)
    shares = []
    for step in range(6):
        batch = flex.next_batch()
        flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch).backward()
        opt.step(), opt.zero_grad()
        flex.end_step()
        w, d = flex.state.sample_weights, flex.state.batch_domains
        shares.append(float(w[d == 0].sum() / w.sum()) / float((d == 0).double().mean()))
        assert rw.refreshed_at == step - step % 3
    assert min(shares) > 1.0            # domain A's samples weigh more than their share of the batch
    flex2 = DataFlex(domains, 24, [AnchorReweighter(anchor="nope")], interface=TorchInterface(model), seed=0)
    b = flex2.next_batch()
    with pytest.raises(ValueError, match="neither a domain"):
        flex2.loss(model(b["input_ids"]), b)


# -- Sow et al.: the large-r start --------------------------------------------------------------------

def test_loss_reweighter_large_r_start_anneals_to_r():
    assert annealed_temperature(10, 10, 0.4, 40.0, 100) == pytest.approx(40.0)
    assert annealed_temperature(60, 10, 0.4, 40.0, 100) == pytest.approx(4.0)
    assert annealed_temperature(110, 10, 0.4, 40.0, 100) == pytest.approx(0.4)
    rw = LossReweighter(burnout_steps=0, initial_temperature=100.0, anneal_steps=10)
    state = DataState(["a"], [8], 8)
    state.losses = LOSSES
    spreads = []
    for step in (0, 5, 10):
        state.step = step
        rw.apply(Event.AFTER_LOSS, state)
        spreads.append(float(state.sample_weights.std()))
    assert spreads[0] < spreads[1] < spreads[2]


# -- every reweighter: shapes, non-negativity, registry ----------------------------------------------

def test_registry_and_configs_name_every_reweighter():
    from pathlib import Path
    configs = {p.stem for p in (Path(__file__).parents[1] / "configs" / "reweighter").glob("*.yaml")}
    assert configs == set(REWEIGHTERS) == {"loss", "tilted", "focal", "rho1", "anchor"}


# -- the loss the session trains on ---------------------------------------------------------------------

def plain_token_mean_step(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    labels = torch.where(batch["loss_mask"].bool(), batch["labels"], -100)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_dataflex_without_plugins_gives_the_plain_token_mean_loss_and_gradients():
    a, b = tiny_gpt(), tiny_gpt()
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, seed=0)
    batch = flex.next_batch()
    ours = flex.loss(b(batch["input_ids"], position_ids=batch["position_ids"]), batch)
    ref = plain_token_mean_step(a, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    ours.backward(), ref.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-8)
    assert flex.end_step()["train_loss"] == pytest.approx(ref.item(), rel=1e-6)


class PoisonLogits:
    """Makes chosen samples' logits produce a non-finite loss (inf at one token, NaN everywhere)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch, inf_rows=(), nan_rows=()):
        logits = self.model(batch["input_ids"], position_ids=batch["position_ids"])
        mask = torch.zeros_like(logits)
        for r in inf_rows:   # -inf on the right label at the first label token: loss +inf there
            t = int(batch["loss_mask"][r].nonzero()[0])
            mask[r, t, batch["labels"][r, t]] = float("-inf")
        return logits + mask


def test_non_finite_losses_weigh_zero_are_counted_and_all_non_finite_stops():
    model = tiny_gpt()
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, [LossReweighter(burnout_steps=0)],
                    interface=TorchInterface(model), seed=0)
    batch = flex.next_batch()
    poison = PoisonLogits(model)
    logits = poison(batch, inf_rows=[2])
    loss = flex.loss(logits, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    rec = flex.end_step()
    assert rec["reweighter/nonfinite"] == 1 and rec["reweighter/nonfinite_samples"] == 0
    # a sample whose every token is non-finite: weight 0, NaN in the ledger, the rest still trains
    batch = flex.next_batch()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    tok = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    tok = torch.where(torch.arange(8).unsqueeze(1) == 5, torch.full_like(tok, float("nan")), tok)
    loss = flex.loss.from_token_loss(tok, batch)
    assert torch.isfinite(loss) and torch.isfinite(flex.state.losses).all()
    rec = flex.end_step()
    assert rec["reweighter/nonfinite_samples"] == 1
    assert math.isnan(rec["ledger"]["loss"][5]) and rec["ledger"]["weight"][5] == 0
    assert all(w > 0 for i, w in enumerate(rec["ledger"]["weight"]) if i != 5)
    assert math.isfinite(rec["train_loss"])
    # every loss non-finite: a clear stop naming the step and the samples
    batch = flex.next_batch()
    with pytest.raises(FloatingPointError, match=r"step 2: every per-sample loss .* NaN or infinite \(samples \["):
        flex.loss.from_token_loss(torch.full(batch["labels"].shape, float("nan")), batch)


def test_composition_mixer_loss_weights_selector_mask_reweighter_weights():
    """The sample weight is domain loss weight x reweighter weight, on the selector's kept samples."""
    model = tiny_gpt()
    mixer = StaticMixer(weights={"A": 0.5, "B": 0.25, "C": 0.25})

    class LossApplied(type(mixer)):
        def apply(self, event, state):
            super().apply(event, state)
            if event == Event.BEFORE_SAMPLE:
                state.domain_loss_weights = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)

    mixer.__class__ = LossApplied
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, [TiltedReweighter(t=0.7), LossSelector(0.5), mixer],
                    interface=TorchInterface(model), seed=0)
    batch = flex.next_batch()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = flex.loss(logits, batch)
    s = flex.state
    assert s.keep_mask.sum() == 8 and torch.equal(s.batch_ids, s.candidate_ids[s.keep_mask])
    w = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)[s.batch_domains] * tilted_weights(s.losses, 0.7) * 8
    n = batch["loss_mask"].sum(-1).double()
    tok = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none") * batch["loss_mask"]
    expected = (w * tok.sum(-1).double()).sum() / (w * n).sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    rec = flex.end_step()
    kept = torch.tensor(rec["ledger"]["selected"])
    torch.testing.assert_close(torch.tensor(rec["ledger"]["weight"], dtype=torch.float64)[kept], w * 8 / w.sum())


def nan_sample_step(flex, model, row=5):
    batch = flex.next_batch()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    tok = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    tok = torch.where(torch.arange(len(tok)).unsqueeze(1) == row, torch.full_like(tok, float("nan")), tok)
    return flex.loss.from_token_loss(tok, batch)


def test_nonfinite_stop_names_step_samples_and_learning_rate():
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, seed=0, nonfinite="stop", optimizer=opt)
    with pytest.raises(FloatingPointError, match=r"step 0: the training loss is NaN or infinite on samples \[\d+\] "
                                                 r"\(\d+ label tokens\) at learning rate 0.25"):
        nan_sample_step(flex, model)
    with pytest.raises(ValueError, match="trainer.nonfinite must be one of"):
        DataFlex(synthetic_domains(n_per_domain=4), 4, nonfinite="ignore")


def test_nonfinite_skip_drops_the_step_with_zero_gradients_and_counts_it():
    from dataflex.mixers import BanditMixer
    model = tiny_gpt()
    mixer = BanditMixer()
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, [mixer], seed=0, nonfinite="skip")
    before = {k: v.clone() for k, v in mixer.state_dict().items() if torch.is_tensor(v)}
    loss = nan_sample_step(flex, model)
    assert flex.skip_step and loss.item() == 0.0
    loss.backward()
    assert all((p.grad == 0).all() for p in model.parameters() if p.grad is not None)
    rec = flex.end_step()
    assert rec["nonfinite/skipped_steps"] == 1 and all(w == 0 for w in rec["ledger"]["weight"])
    after = {k: v for k, v in mixer.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(before[k], after[k]) for k in before)      # the mixer learnt nothing from it
    batch = flex.next_batch()                                          # the next clean step trains
    assert flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch).item() > 0
    assert not flex.skip_step
