"""dataflex.session.flex.DataFlex: the loop with all three plugin families, the step record, resume, errors."""

import pytest
import torch
from conftest import leave_spawned_group, roundtrip, synthetic_domains, tiny_gpt

from dataflex.core.loss import per_sample_loss
from dataflex.core.plugin import Reweighter
from dataflex.data.mixture import MixtureDataset
from dataflex.grad.api import per_sample_grads
from dataflex.grad.interface import TorchInterface
from dataflex.grad.projection import RademacherProjector
from dataflex.mixers import MIXERS, BanditMixer, StaticMixer
from dataflex.reweighters import LossReweighter
from dataflex.selectors import LossSelector
from dataflex.session.flex import DataFlex

LEDGER_COLUMNS = ["step", "rank", "row", "sample_id", "domain", "selected", "weight", "loss"]


def make_run(seed=0, burnout=1):
    model = tiny_gpt()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    flex = DataFlex(synthetic_domains(n_per_domain=24), global_batch_size=8,
                    plugins=[LossReweighter(burnout_steps=burnout), LossSelector(0.5), BanditMixer(reward_scale=2.0)],
                    interface=TorchInterface(model), seed=seed)
    return model, opt, flex


def train_step(flex, model, opt):
    batch = flex.next_batch()
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = flex.loss(logits, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    record = flex.end_step()
    return batch, logits.detach(), loss.detach(), record


def test_full_loop_with_all_three_families():
    model, opt, flex = make_run()
    assert [p.family for p in flex.engine.plugins] == ["mixer", "selector", "reweighter"]
    names = flex.data.names
    for step in range(5):
        batch, logits, loss, rec = train_step(flex, model, opt)
        s = flex.state
        assert rec["step"] == step
        # domain weights: the bandit's policy used for this step's draw
        assert list(rec["domain_weights"]) == names
        assert sum(rec["domain_weights"].values()) == pytest.approx(1.0)
        # per-domain losses are means of the step's per-sample losses
        per_sample = per_sample_loss(logits, batch["labels"], batch["loss_mask"])
        torch.testing.assert_close(s.losses, per_sample)
        for d, v in rec["domain_loss"].items():
            i = names.index(d)
            assert v == pytest.approx(float(per_sample[s.batch_domains == i].double().mean()), rel=1e-9)
        assert set(rec["domain_loss"]) == {names[i] for i in s.batch_domains.tolist()}
        n = batch["loss_mask"].sum(-1).double()
        assert rec["train_loss"] == pytest.approx(float((n * per_sample).sum() / n.sum()), rel=1e-6)
        # the scalar trained on is the reweighted token mean; all ones during burnout
        w = s.sample_weights
        if step < 1:
            assert torch.equal(w, torch.ones(8, dtype=torch.float64))
        else:
            assert w.std() > 0
        assert w.mean().item() == pytest.approx(1.0, abs=1e-9)
        expected = (w * n * per_sample.double()).sum() / (w * n).sum()
        assert loss.item() == pytest.approx(float(expected), rel=1e-6)
        # ledger: equal-length columns over the 16 candidates
        ledger = rec["ledger"]
        assert list(ledger) == LEDGER_COLUMNS
        assert {len(v) for v in ledger.values()} == {16}
        kept = torch.tensor(ledger["selected"])
        assert int(kept.sum()) == 8
        torch.testing.assert_close(torch.tensor(ledger["weight"], dtype=torch.float64)[kept], w)
        assert torch.tensor(ledger["sample_id"])[kept].tolist() == s.batch_ids.tolist()
        assert [names[d] for d in flex.data.domain[torch.tensor(ledger["sample_id"])].tolist()] == ledger["domain"]
        assert not any(torch.tensor(ledger["loss"]).isnan())
        # every family reported
        assert any(k.startswith("bandit/reward_hat/") for k in rec)
        assert "reweighter/weight_std" in rec and "selector/kept_loss_mean" in rec
        assert rec["selected_fraction"] == 0.5
    assert flex.step == 5
    assert set(flex.engine.traces) >= {"BanditMixer/before_sample", "LossSelector/after_candidates",
                                        "LossReweighter/after_loss", "BanditMixer/batch_end"}


def test_resume_mid_run_matches_an_uninterrupted_run():
    total, cut = 7, 3
    model, opt, flex = make_run(seed=5)
    straight = [train_step(flex, model, opt) for _ in range(total)]

    model, opt, flex = make_run(seed=5)
    first = [train_step(flex, model, opt) for _ in range(cut)]
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    ckpt["flex"] = flex.state_dict()  # in memory: must be a snapshot, not a live view of the run
    train_step(flex, model, opt)
    train_step(flex, model, opt)

    model2, opt2, flex2 = make_run(seed=123)  # a different seed: the state must carry it
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    flex2.load_state_dict(ckpt["flex"])
    resumed = first + [train_step(flex2, model2, opt2) for _ in range(total - cut)]

    for (b1, _, l1, r1), (b2, _, l2, r2) in zip(straight, resumed):
        assert torch.equal(b1["sample_id"], b2["sample_id"])
        assert l1.item() == l2.item()
        assert r1["ledger"] == r2["ledger"]
        assert r1 == r2
    # and the weights did evolve over the run, so the comparison covers the bandit's state
    assert straight[0][3]["domain_weights"] != straight[-1][3]["domain_weights"]


def test_evaluate_reports_per_domain_validation_loss():
    model = tiny_gpt()
    data = synthetic_domains(n_per_domain=6, seed=1)
    val = MixtureDataset(data)
    seen = {}

    class Spy(StaticMixer):
        def update(self, event, state):
            seen[event] = dict(state.val_loss)

    flex = DataFlex(synthetic_domains(n_per_domain=6), global_batch_size=4, plugins=[Spy()],
                    interface=TorchInterface(model), probe_batch_size=5)
    result = flex.evaluate(val)
    full = val.batch(torch.arange(len(val)))
    with torch.no_grad():
        losses = per_sample_loss(model(full["input_ids"], position_ids=full["position_ids"]), full["labels"],
                                 full["loss_mask"])
    for i, name in enumerate(val.names):
        assert result[name] == pytest.approx(float(losses[val.domain == i].double().mean()), rel=1e-5)
    assert list(seen.values())[0] == result


def test_signals_per_sample_grads_by_id():
    model = tiny_gpt()
    flex = DataFlex(synthetic_domains(n_per_domain=6), global_batch_size=4, interface=TorchInterface(model))
    ids = torch.tensor([0, 7, 13, 5])
    got = flex.state.signals.per_sample_grads(ids, params=r"blocks\.1\.fc")
    ref = per_sample_grads(model, flex.data.batch(ids), params=r"blocks\.1\.fc")
    torch.testing.assert_close(got.norms, ref.norms)
    for k in ref.grads:
        torch.testing.assert_close(got.grads[k], ref.grads[k])
    proj = flex.state.signals.per_sample_grads(ids, params=r"blocks\.1\.fc", projector=RademacherProjector(16))
    torch.testing.assert_close(proj.projected, ref.flat() @ RademacherProjector(16).matrix(ref.flat().shape[1]),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="interface"):
        DataFlex(synthetic_domains(n_per_domain=6), global_batch_size=4).state.signals.per_sample_grads(ids)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"unknown mixer .nope.; available mixers: .*bandit.*static"):
        MIXERS.build("nope")
    with pytest.raises(ValueError, match=r"one mixer per run, got \['BanditMixer', 'StaticMixer'\]"):
        DataFlex(synthetic_domains(n_per_domain=4), global_batch_size=4, plugins=[BanditMixer(), StaticMixer()])
    with pytest.raises(ValueError, match="must divide by the 3 ranks"):
        DataFlex(synthetic_domains(n_per_domain=4), global_batch_size=4, rank=0, world_size=3)
    flex = DataFlex(synthetic_domains(n_per_domain=4), global_batch_size=4)
    flex.next_batch()
    with pytest.raises(RuntimeError, match=r"end_step\(\) before flex.loss"):
        flex.end_step()
    # a checkpoint from a run with other plugins is refused
    other = DataFlex(synthetic_domains(n_per_domain=4), global_batch_size=4, plugins=[BanditMixer()])
    with pytest.raises(ValueError, match="checkpoint holds plugins"):
        other.load_state_dict(flex.state_dict())


class _Steer(StaticMixer):
    """Turns all weight to domain C and masks C's even samples at the end of step 0."""

    def update(self, event, state):
        if state.step == 0 and event.value == "batch_end":
            self._weights = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
            state.pool_masks[2] = torch.arange(state.domain_sizes[2]) % 2 == 1


def test_decisions_take_effect_at_the_next_step():
    """What plugins decide after step t shapes the batch of step t + 1, not some later one."""
    model = tiny_gpt()
    steer = _Steer()
    flex = DataFlex(synthetic_domains(n_per_domain=24), global_batch_size=8, plugins=[steer],
                    interface=TorchInterface(model))
    for step in range(3):
        batch = flex.next_batch()
        flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        if step == 0:
            assert len(set(batch["domain"].tolist())) > 1
        else:
            assert (batch["domain"] == 2).all()
            local = flex.sampler.local_index(batch["sample_id"])
            assert (local % 2 == 1).all()
        flex.end_step()


class _RankLocalMixer(StaticMixer):
    """A broken plugin: weights that depend on the rank (what an unseeded RNG does)."""

    def weights(self, state):
        import torch.distributed as dist
        w = torch.ones(state.num_domains, dtype=torch.float64)
        w[dist.get_rank() % state.num_domains] += 1
        return w


def _divergence_worker(rank, init_file, out_dir):
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_gpt()
        flex = DataFlex(synthetic_domains(n_per_domain=16), global_batch_size=8, plugins=[_RankLocalMixer()],
                        check_ranks_every=1)
        try:
            train_step(flex, model, torch.optim.SGD(model.parameters(), lr=0.1))
            message = "no error"
        except RuntimeError as e:
            message = str(e)
        open(os.path.join(out_dir, f"rank{rank}.txt"), "w").write(message)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_spawned_group()


def test_ranks_that_disagree_are_caught(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_divergence_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert "ranks disagree on the data of step 0" in (tmp_path / f"rank{rank}.txt").read_text()


class _DivergeAtStep3(Reweighter):
    """Rank 1 weighs differently at step 3 only: a plugin bug the per-step check must catch."""

    def weigh(self, state):
        w = torch.ones(state.losses.numel(), dtype=torch.float64)
        if state.step == 3 and torch.distributed.get_rank() == 1:
            w[0] = 2.0
        return w


class _MixerDivergeAtStep3(StaticMixer):
    def weights(self, state):
        w = super().weights(state).clone()
        if state.step == 3 and torch.distributed.get_rank() == 1:
            w[0] += 0.5
        return w


def _diverge_at_3_worker(rank, init_file, out_dir, kind):
    import os

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_gpt()
        plugin = _DivergeAtStep3() if kind == "reweighter" else _MixerDivergeAtStep3("uniform")
        flex = DataFlex(synthetic_domains(n_per_domain=16), global_batch_size=8, plugins=[plugin],
                        check_ranks_every=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        message = "no error"
        try:
            for _ in range(6):
                train_step(flex, model, opt)
                if flex.step == 4:   # a checkpoint right after the diverging step compares its weights too
                    flex.state_dict()
        except RuntimeError as e:
            message = f"{flex.state.step}: {e}"
        open(os.path.join(out_dir, f"{kind}{rank}.txt"), "w").write(message)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_spawned_group()


@pytest.mark.parametrize("kind", ["mixer", "reweighter"])
def test_a_plugin_diverging_at_step_3_is_caught_at_step_3(tmp_path, kind):
    import torch.multiprocessing as mp
    mp.spawn(_diverge_at_3_worker, args=(str(tmp_path / "pg"), str(tmp_path), kind), nprocs=2, join=True)
    what = "data" if kind == "mixer" else "sample weights"
    for rank in range(2):
        text = (tmp_path / f"{kind}{rank}.txt").read_text()
        assert f"ranks disagree on the {what} of step 3" in text or \
            (kind == "reweighter" and "ranks disagree on the data of step 3" in text), text
