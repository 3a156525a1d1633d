"""Loss-based online batch selection (dataflex.selectors.loss) on its own and inside DataFlex."""
import pytest
import torch
from conftest import synthetic_domains, tiny_gpt

from dataflex.core.loss import per_sample_loss
from dataflex.grad.interface import TorchInterface
from dataflex.selectors import SELECTORS, LossSelector, select_top_loss
from dataflex.session.flex import DataFlex


def test_select_top_loss_picks_the_k_largest():
    g = torch.Generator().manual_seed(0)
    for n, k in [(10, 1), (10, 4), (33, 17), (5, 5)]:
        losses = torch.rand(n, generator=g)
        mask = select_top_loss(losses, k)
        assert mask.dtype == torch.bool and int(mask.sum()) == k
        assert set(torch.nonzero(mask).flatten().tolist()) == set(torch.topk(losses, k).indices.tolist())
        if k < n:
            assert losses[mask].min() > losses[~mask].max()


def test_select_top_loss_ties_go_to_the_earlier_candidate():
    losses = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.5, 3.0])
    assert torch.nonzero(select_top_loss(losses, 2)).flatten().tolist() == [1, 3]
    assert torch.nonzero(select_top_loss(losses, 3)).flatten().tolist() == [1, 3, 4]
    assert torch.nonzero(select_top_loss(torch.zeros(6), 3)).flatten().tolist() == [0, 1, 2]
    for bad in (0, 8, -1):
        with pytest.raises(ValueError, match="cannot keep"):
            select_top_loss(losses, bad)


def test_loss_selector_arguments():
    assert LossSelector(0.25).candidate_factor == 4.0
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_fraction"):
            LossSelector(bad)
    with pytest.raises(ValueError, match=r"unknown selector .top.; available selectors: bm25, cluster_less, delta_loss, gradnorm, length_matched, less, loss, near, random, rho, tracin, tsds"):
        SELECTORS.build("top")


def _train_steps(flex, model, steps, opt=None):
    records = []
    for _ in range(steps):
        batch = flex.next_batch()
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        records.append(flex.end_step())
    return records


@pytest.mark.parametrize("keep_fraction,probe_batch_size", [(0.5, 64), (0.3, 5)])
def test_loss_selector_keeps_top_probe_losses_in_dataflex(keep_fraction, probe_batch_size):
    torch.manual_seed(0)
    model = tiny_gpt()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = synthetic_domains(n_per_domain=24)
    B = 8
    flex = DataFlex(data, global_batch_size=B, plugins=[LossSelector(keep_fraction)],
                    interface=TorchInterface(model), probe_batch_size=probe_batch_size, seed=2)
    for step in range(3):
        batch = flex.next_batch()
        s = flex.state
        C = round(B / keep_fraction)
        assert len(s.candidate_ids) == C
        assert model.training  # probing restores the training mode
        # the probe losses are the model's per-sample losses on the candidates
        cand = flex.data.batch(s.candidate_ids)
        with torch.no_grad():
            direct = per_sample_loss(model(cand["input_ids"], position_ids=cand["position_ids"]),
                                     cand["labels"], cand["loss_mask"])
        torch.testing.assert_close(s.candidate_losses, direct, rtol=1e-5, atol=1e-6)
        # the kept ones are exactly the top B of those losses
        assert int(s.keep_mask.sum()) == B
        assert s.candidate_losses[s.keep_mask].min() >= s.candidate_losses[~s.keep_mask].max()
        assert torch.equal(s.keep_mask, select_top_loss(s.candidate_losses, B))
        assert torch.equal(s.batch_ids, s.candidate_ids[s.keep_mask])  # candidate order kept
        assert torch.equal(batch["sample_id"], s.batch_ids)
        # train on tempered logits, so the training loss of a kept sample differs from its probe loss
        logits = 0.8 * model(batch["input_ids"], position_ids=batch["position_ids"])
        loss = flex.loss(logits, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        record = flex.end_step()
        assert record["selected_fraction"] == pytest.approx(B / C)
        assert record["selector/kept_loss_mean"] == pytest.approx(float(direct[s.keep_mask].mean()), rel=1e-5)
        assert record["selector/candidate_loss_mean"] == pytest.approx(float(direct.mean()), rel=1e-5)
        ledger = record["ledger"]
        assert {len(v) for v in ledger.values()} == {C}
        assert ledger["selected"] == s.keep_mask.tolist()
        assert ledger["sample_id"] == s.candidate_ids.tolist()
        assert ledger["step"] == [step] * C
        kept = s.keep_mask
        # kept rows carry the training loss, the others their probe loss
        loss_col = torch.tensor(ledger["loss"], dtype=torch.float64)
        assert torch.equal(loss_col[kept], s.losses.double())
        assert (loss_col[kept] - direct[kept].double()).abs().min() > 1e-4
        torch.testing.assert_close(loss_col[~kept], direct[~kept].double(), rtol=1e-5, atol=1e-6)
        assert torch.tensor(ledger["weight"])[~kept].eq(0).all() and torch.tensor(ledger["weight"])[kept].eq(1).all()
        assert [r for r, k in zip(ledger["rank"], ledger["selected"]) if not k] == [-1] * (C - B)
        assert [r for r, k in zip(ledger["rank"], ledger["selected"]) if k] == [0] * B
        assert ledger["domain"] == [flex.data.names[d] for d in flex.data.domain[s.candidate_ids].tolist()]


def test_selector_needs_an_interface():
    flex = DataFlex(synthetic_domains(n_per_domain=8), global_batch_size=4, plugins=[LossSelector(0.5)])
    with pytest.raises(RuntimeError, match="interface"):
        flex.next_batch()
