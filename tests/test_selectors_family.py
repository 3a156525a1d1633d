"""random, RHO-LOSS, delta-loss and GraNd/EL2N selectors (spec section 9)."""
import pytest
import torch
from conftest import SEQ, VOCAB, roundtrip, synthetic_domains, tiny_gpt, train_steps

from dataflex.data.samples import SampleSet
from dataflex.grad.interface import TorchInterface
from dataflex.selectors import (
    DeltaLossSelector,
    GradNormSelector,
    RandomSelector,
    RhoLossSelector,
    el2n,
    select_random,
)
from dataflex.session.flex import DataFlex

run_steps = train_steps


def test_random_keeps_k_from_seed_and_step_only():
    a = select_random(20, 5, seed=3, step=7)
    assert int(a.sum()) == 5 and torch.equal(a, select_random(20, 5, seed=3, step=7))
    assert not torch.equal(a, select_random(20, 5, seed=3, step=8))
    assert not torch.equal(a, select_random(20, 5, seed=4, step=7))
    model = tiny_gpt()
    flex = DataFlex(synthetic_domains(n_per_domain=16), 8, [RandomSelector(0.25, seed=1)], TorchInterface(model))
    kept = run_steps(flex, model, 2)
    assert all(len(k) == 8 for k in kept) and flex.state.candidate_ids.numel() == 32


def test_random_pool_scope_trains_on_a_fixed_fraction_and_resumes_exactly():
    from dataflex.selectors.random import random_pool
    keep = random_pool(64, 0.25, seed=3)
    assert int(keep.sum()) == 16 and torch.equal(keep, random_pool(64, 0.25, seed=3))
    assert not torch.equal(keep, random_pool(64, 0.25, seed=4))
    domains = synthetic_domains(n_per_domain=32)
    sizes = [len(d) for d in domains.values()]
    model = tiny_gpt()
    flex = DataFlex(domains, 8, [RandomSelector(0.25, seed=3, scope="pool")], TorchInterface(model))
    kept = torch.cat(run_steps(flex, model, 6))
    assert set(kept.tolist()) <= set(torch.nonzero(random_pool(sum(sizes), 0.25, 3)).flatten().tolist())
    saved = roundtrip(flex.state_dict())
    after = run_steps(flex, model, 2)
    model2 = tiny_gpt()
    flex2 = DataFlex(domains, 8, [RandomSelector(0.25, seed=3, scope="pool")], TorchInterface(model2))
    flex2.load_state_dict(saved)
    model2.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(after, run_steps(flex2, model2, 2)))
    with pytest.raises(ValueError, match="scope"):
        RandomSelector(0.5, scope="domain")


def noisy_pool(n=48, noisy_fraction=0.5, seed=0):
    """Domain C of the toy corpus (a learnable rule) with the labels of half its samples replaced by
    random tokens (label noise), and a clean holdout set of the same rule."""
    domains = synthetic_domains(n_per_domain=2 * n, seed=seed)
    c = domains["C"]
    g = torch.Generator().manual_seed(seed + 1)
    labels = c.labels[:n].clone()
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[: int(n * noisy_fraction)] = True
    labels[noisy] = torch.randint(1, VOCAB, (int(noisy.sum()), SEQ), generator=g)
    pool = SampleSet(c.input_ids[:n], labels, c.loss_mask[:n], c.doc_ids[:n], c.chunks[:n])
    holdout = SampleSet(c.input_ids[n:], c.labels[n:], c.loss_mask[n:], c.doc_ids[n:], c.chunks[n:])
    return pool, holdout, noisy


def test_rho_loss_selects_fewer_noisy_samples_than_top_loss():
    pool, holdout, noisy = noisy_pool()
    il_model = tiny_gpt(seed=5)
    run_steps(DataFlex({"C": holdout}, 16, seed=1), il_model, 30)          # the irreducible-loss model
    chosen = {}
    for name, selector in (("loss", None), ("rho", RhoLossSelector(reference=il_model, keep_fraction=0.25))):
        from dataflex.selectors import LossSelector
        model = tiny_gpt(seed=6)
        flex = DataFlex({"C": pool}, 8, [selector or LossSelector(0.25)], TorchInterface(model), seed=2)
        kept = torch.cat(run_steps(flex, model, 5))
        chosen[name] = float(noisy[kept].double().mean())
    assert chosen["rho"] < 0.5 * chosen["loss"], chosen
    assert chosen["rho"] < 0.25, chosen
    with pytest.raises(ValueError, match="irreducible-loss model"):
        RhoLossSelector()


def test_el2n_formula():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    p = torch.softmax(logits.double(), -1)
    err = (p - torch.nn.functional.one_hot(labels, 7).double()).norm(dim=-1)
    expected = torch.stack([err[i][mask[i] > 0].mean() for i in range(3)])
    torch.testing.assert_close(el2n(logits, labels, mask), expected)


@pytest.mark.parametrize("score", ["grand", "el2n"])
def test_gradnorm_keeps_the_largest_scores(score):
    model = tiny_gpt()
    iface = TorchInterface(model)
    flex = DataFlex(synthetic_domains(n_per_domain=16), 4, [GradNormSelector(0.5, score=score)], iface, seed=0)
    batch = flex.next_batch()
    cand = flex.data.batch(flex.state.candidate_ids)
    if score == "grand":
        scores = iface.per_sample_grads(cand).norms          # the materialised reference
    else:
        logits = model(cand["input_ids"], position_ids=cand["position_ids"]).detach()
        scores = el2n(logits, cand["labels"], cand["loss_mask"])
    expected = set(flex.state.candidate_ids[torch.topk(scores, 4).indices].tolist())
    assert set(flex.state.batch_ids.tolist()) == expected
    assert len(batch["input_ids"]) == 4


def count_pool_probes(flex, N, others=None):
    """Wrap the session's probe: a list that gets one entry per probe of the whole pool (the ids of the
    other probes go to `others`)."""
    calls, probe = [], flex.state.signals.probe

    def counting(ids, *args, **kwargs):
        if len(ids) == N:
            calls.append(len(ids))
        elif others is not None:
            others.append(torch.as_tensor(ids).clone())
        return probe(ids, *args, **kwargs)

    flex.state.signals.probe = counting
    return calls


def test_delta_loss_baseline_is_the_pool_loss_under_the_initial_model():
    """The baseline is every pool sample's loss under the initial model (checked against a copy of that
    model), so candidates drawn for the first time late in training score their real drop: the kept
    set is the top k of initial - current, computed here independently. (The former baseline, each
    sample's loss when first probed, gave every new candidate 0.)"""
    import copy
    model = tiny_gpt()
    initial = copy.deepcopy(model)
    domains = synthetic_domains(n_per_domain=64)
    N = sum(len(d) for d in domains.values())
    sel = DeltaLossSelector(0.25)
    flex = DataFlex(domains, 4, [sel], TorchInterface(model), seed=0)
    probed = []
    calls = count_pool_probes(flex, N, probed)
    run_steps(flex, model, 5, lr=3e-2)
    at_select = copy.deepcopy(model)                                  # the model that makes the 6th selection
    run_steps(flex, model, 1, lr=3e-2)
    assert calls == [N]                                              # one probe pass over the pool, cached
    expected_initial = TorchInterface(initial).probe(flex.data.batch(torch.arange(N)), "loss").double()
    torch.testing.assert_close(sel.initial, expected_initial, rtol=0, atol=1e-5)
    s = flex.state
    current = TorchInterface(at_select).probe(flex.data.batch(s.candidate_ids), "loss").double()
    drop = expected_initial[s.candidate_ids] - current
    order = torch.sort(drop, descending=True, stable=True).indices
    assert set(s.candidate_ids[s.keep_mask].tolist()) == set(s.candidate_ids[order[:4]].tolist())
    assert len(probed) == 6 and torch.equal(probed[-1], s.candidate_ids)
    seen = set(torch.cat(probed[:-1]).tolist())                       # candidates of the earlier steps
    fresh = torch.tensor([i not in seen for i in s.candidate_ids.tolist()])
    assert fresh.any() and (drop[fresh].abs() > 1e-3).all()         # first-time candidates: real drops


def test_delta_loss_resumes_exactly_without_probing_the_pool_again():
    domains = synthetic_domains(n_per_domain=16)
    N = sum(len(d) for d in domains.values())
    model = tiny_gpt()
    sel = DeltaLossSelector(0.5, prefer="stuck")
    flex = DataFlex(domains, 4, [sel], TorchInterface(model), seed=0)
    run_steps(flex, model, 3, lr=3e-2)
    saved, weights = roundtrip(flex.state_dict()), roundtrip(model.state_dict())
    after = run_steps(flex, model, 3, lr=3e-2)
    model2 = tiny_gpt()
    model2.load_state_dict(weights)
    sel2 = DeltaLossSelector(0.5, prefer="stuck")
    flex2 = DataFlex(domains, 4, [sel2], TorchInterface(model2), seed=0)
    flex2.load_state_dict(saved)
    calls = count_pool_probes(flex2, N)
    assert all(torch.equal(a, b) for a, b in zip(after, run_steps(flex2, model2, 3, lr=3e-2)))
    assert calls == [] and torch.equal(sel2.initial, sel.initial)
    with pytest.raises(ValueError, match="baseline"):
        DeltaLossSelector(0.5, baseline="first_probe").load_state_dict(roundtrip(sel.state_dict()))


def test_delta_loss_first_probe_baseline_is_what_its_documentation_says():
    """baseline=first_probe: on the first pass every candidate is new, scores 0, and the first k in draw
    order are kept; a candidate's baseline is its loss when first drawn."""
    model = tiny_gpt()
    sel = DeltaLossSelector(0.5, baseline="first_probe")
    flex = DataFlex(synthetic_domains(n_per_domain=16), 4, [sel], TorchInterface(model), seed=0)
    flex.next_batch()
    assert flex.state.keep_mask.tolist() == [True] * 4 + [False] * 4
    assert sel.initial is None and len(sel.first) == len(set(flex.state.candidate_ids.tolist()))
    with pytest.raises(ValueError, match="baseline"):
        DeltaLossSelector(0.5, baseline="initial")


@pytest.mark.parametrize("normalize", [False, True])
def test_tracin_keeps_the_largest_alignment_with_the_target_gradient(normalize):
    from dataflex.selectors import TracInSelector
    model = tiny_gpt()
    iface = TorchInterface(model)
    domains = synthetic_domains(n_per_domain=16)
    val = synthetic_domains(n_per_domain=6, seed=9)
    sel = TracInSelector(target="C", keep_fraction=0.5, target_samples=6, normalize=normalize)
    flex = DataFlex(domains, 4, [sel], iface, seed=0, datasets={"val": val})
    flex.next_batch()
    # the reference: materialised per-sample gradients and the target's mean gradient
    cand = flex.data.batch(flex.state.candidate_ids)
    g = iface.per_sample_grads(cand).flat().double()
    vset = flex.datasets["val"]
    vid = torch.nonzero(vset.domain[torch.arange(len(vset))] == 2).flatten()
    target = iface.per_sample_grads(vset.batch(vid)).flat().double().mean(0)
    scores = g @ target
    if normalize:
        scores = scores / g.norm(dim=1)
    expected = set(flex.state.candidate_ids[torch.topk(scores, 4).indices].tolist())
    assert set(flex.state.batch_ids.tolist()) == expected
    # C's own samples align best with C's target gradient
    assert (flex.state.batch_domains == 2).sum() >= (flex.state.candidate_domains == 2).sum() * 0.5
