"""dataflex.core.sampler.DataAwareSampler: draws follow the weights, masks, rank slices, exact resume."""
import copy
import json
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import roundtrip
from scipy.stats import chisquare

from dataflex.core.sampler import DataAwareSampler, FeistelPermutation


def domains_of(sampler, ids):
    return sampler.domain_of(ids)


def test_draws_follow_the_weights_chi_square():
    w = [0.5, 0.3, 0.15, 0.05]
    s = DataAwareSampler([50, 40, 30, 20], seed=123, weights=w)
    n = 20_000
    ids = s.draw(n)
    assert ids.shape == (n,) and ids.dtype == torch.long
    counts = torch.bincount(domains_of(s, ids), minlength=4).numpy()
    stat, p = chisquare(counts, f_exp=np.array(w) * n)
    assert p > 1e-3, (counts, p)
    # and it is a real test: the same counts are rejected against uniform weights
    assert chisquare(counts, f_exp=np.full(4, n / 4)).pvalue < 1e-6
    # ids stay inside their domain
    local = s.local_index(ids)
    sizes = torch.tensor([50, 40, 30, 20])
    assert (local >= 0).all() and (local < sizes[domains_of(s, ids)]).all()


def test_weights_are_normalised_and_zero_weight_domains_never_drawn():
    s = DataAwareSampler([5, 5, 5], seed=0)
    torch.testing.assert_close(s.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    s.set_weights([2.0, 0.0, 6.0])
    torch.testing.assert_close(s.weights, torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    d = domains_of(s, s.draw(3000))
    assert (d != 1).all()
    assert (d == 0).any() and (d == 2).any()


def test_domain_is_a_permutation_within_an_epoch():
    s = DataAwareSampler([7, 13], seed=5, weights=[0.0, 1.0])
    ids = s.draw(13 * 3)
    local = s.local_index(ids)
    assert (domains_of(s, ids) == 1).all()
    epochs = [local[i * 13:(i + 1) * 13] for i in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(13))
    # a fresh order every epoch
    assert not torch.equal(epochs[0], epochs[1])


def test_keep_masks_are_honoured():
    s = DataAwareSampler([10, 8], seed=1, weights=[1.0, 1.0])
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[0, 3, 4, 8]] = True
    s.set_keep_mask(0, keep)
    ids = s.draw(400)
    d, local = domains_of(s, ids), s.local_index(ids)
    assert set(local[d == 0].tolist()) == {0, 3, 4, 8}
    assert set(local[d == 1].tolist()) == set(range(8))
    # within an epoch of the kept samples, no repetition: domain 0 alone
    s.set_weights([1.0, 0.0])
    s2 = DataAwareSampler([10, 8], seed=9, weights=[1.0, 0.0])
    s2.set_keep_mask(0, keep)
    local = s2.local_index(s2.draw(4 * 5))
    for e in range(5):
        assert sorted(local[4 * e:4 * (e + 1)].tolist()) == [0, 3, 4, 8]
    # lifting the mask restores the full domain
    s2.set_keep_mask(0, None)
    assert set(s2.local_index(s2.draw(200)).tolist()) == set(range(10))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_slices_are_disjoint_cover_and_agree_across_ranks(world_size):
    B = 12
    samplers = [DataAwareSampler([20, 30, 10], seed=77, rank=r, world_size=world_size, weights=[0.2, 0.5, 0.3])
                for r in range(world_size)]
    for _ in range(3):
        drawn = [s.draw(B) for s in samplers]
        for other in drawn[1:]:
            assert torch.equal(other, drawn[0])  # every rank computes the same global batch
        slices = [s.rank_slice(g) for s, g in zip(samplers, drawn)]
        assert all(len(x) == B // world_size for x in slices)
        assert torch.equal(torch.cat(slices), drawn[0])
        positions = [set(range(r * B // world_size, (r + 1) * B // world_size)) for r in range(world_size)]
        assert set().union(*positions) == set(range(B))
    # batches() yields the rank's slice of successive global draws
    ref = DataAwareSampler([20, 30, 10], seed=77, weights=[0.2, 0.5, 0.3])
    gens = [s.batches(B) for s in [DataAwareSampler([20, 30, 10], seed=77, rank=r, world_size=world_size,
                                                    weights=[0.2, 0.5, 0.3]) for r in range(world_size)]]
    for _ in range(2):
        parts = [next(g) for g in gens]
        assert sum(parts, []) == ref.draw(B).tolist()


def test_rank_slices_cover_uneven_batches():
    s = DataAwareSampler([5], seed=0, world_size=4)
    ids = torch.arange(10)
    parts = [s.rank_slice(ids, r) for r in range(4)]
    assert torch.equal(torch.cat(parts), ids)


def _sampler():
    return DataAwareSampler([6, 4, 9], seed=3, weights=[0.3, 0.3, 0.4], domain_names=["a", "b", "c"])


def test_state_dict_resumes_exactly_across_changes_and_epochs():
    s = _sampler()
    first = s.draw(11)  # the 4-sample domain has wrapped into its next epoch by now (and so will others)
    keep = torch.tensor([True, False, True, True, False, True, False, True, True])
    s.set_keep_mask(2, keep)
    s.set_weights([0.6, 0.1, 0.3])
    s.draw(7)
    assert max(s.epoch) >= 1
    state = roundtrip(s.state_dict())
    cont = s.draw(25)
    s.set_weights([0.0, 0.5, 0.5])
    s.set_keep_mask(1, torch.tensor([False, True, True, False]))
    cont = torch.cat([cont, s.draw(25)])

    fresh = DataAwareSampler([6, 4, 9], seed=999)  # the seed comes from the state
    fresh.load_state_dict(state)
    again = fresh.draw(25)
    fresh.set_weights([0.0, 0.5, 0.5])
    fresh.set_keep_mask(1, torch.tensor([False, True, True, False]))
    again = torch.cat([again, fresh.draw(25)])
    assert torch.equal(again, cont)
    assert fresh.epoch == s.epoch and fresh.cursor == s.cursor
    # the mask in the state was honoured after the resume
    d, local = domains_of(fresh, again), fresh.local_index(again)
    assert keep[local[d == 2]].all()
    assert not torch.equal(first, again[:11])


def test_state_dict_is_a_snapshot():
    s = _sampler()
    s.draw(5)
    state = copy.deepcopy(s.state_dict())
    live = s.state_dict()
    s.set_weights([1.0, 0.0, 0.0])
    s.set_keep_mask(0, torch.ones(6, dtype=torch.bool))
    s.draw(5)
    for k in ("cursor", "epoch"):
        assert live[k] == state[k]
    assert torch.equal(live["weights"], state["weights"])
    assert live["keep"] == [None, None, None]
    assert torch.equal(live["generator"], state["generator"])


def test_own_generator_isolated_from_global_rngs():
    a, b = _sampler(), _sampler()
    plain = torch.cat([a.draw(10) for _ in range(5)])
    noisy = []
    for i in range(5):
        torch.manual_seed(1000 + i)
        np.random.seed(i)
        torch.rand(17)
        np.random.rand(3)
        noisy.append(b.draw(10))
    assert torch.equal(torch.cat(noisy), plain)


def test_different_seeds_give_different_draws():
    a = DataAwareSampler([50, 50], seed=1).draw(100)
    b = DataAwareSampler([50, 50], seed=2).draw(100)
    assert not torch.equal(a, b)


def test_errors():
    with pytest.raises(ValueError, match=r"empty domain.*'b'"):
        DataAwareSampler([3, 0, 2], domain_names=["a", "b", "c"])
    s = DataAwareSampler([3, 4], domain_names=["a", "b"])
    for bad in ([1.0], [1.0, 2.0, 3.0], [-0.1, 1.1], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0]):
        with pytest.raises(ValueError, match="domain weights"):
            s.set_weights(bad)
    with pytest.raises(ValueError, match="must have shape"):
        s.set_keep_mask(0, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="excludes every sample of domain 'a'"):
        s.set_keep_mask(0, torch.zeros(3, dtype=torch.bool))
    # allowed while the domain has no weight, but then the domain cannot be given weight
    s.set_weights([0.0, 1.0])
    s.set_keep_mask(0, torch.zeros(3, dtype=torch.bool))
    assert set(domains_of(s, s.draw(50)).tolist()) == {1}
    with pytest.raises(ValueError, match="keep mask excludes every sample"):
        s.set_weights([0.5, 0.5])
    # a failed call leaves the weights as they were
    torch.testing.assert_close(s.weights, torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="domain sizes"):
        DataAwareSampler([3, 5]).load_state_dict(DataAwareSampler([3, 4]).state_dict())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 10, 13, 100, 257, 1000, 4095, 4097, 65537, 100_003])
def test_feistel_is_a_bijection_on_any_size(n):
    for key in (0, 1, 2**63 + 12345):
        out = FeistelPermutation(n, key)(np.arange(n))
        assert out.dtype == np.int64 and np.array_equal(np.sort(out), np.arange(n))
    if n >= 100:  # keys give different orders, and the order is not the identity
        a, b = FeistelPermutation(n, 1)(np.arange(n)), FeistelPermutation(n, 2)(np.arange(n))
        assert not np.array_equal(a, b) and (a != np.arange(n)).mean() > 0.9


def test_sampler_epochs_of_odd_sizes_visit_every_sample_once():
    s = DataAwareSampler([37, 1001], seed=4, weights=[0.0, 1.0])
    ids = s.local_index(s.draw(1001 * 2))
    for e in range(2):
        assert sorted(ids[1001 * e:1001 * (e + 1)].tolist()) == list(range(1001))


def test_sampler_memory_does_not_grow_with_domain_size():
    def peak(size):
        tracemalloc.start()
        s = DataAwareSampler([size, 10], seed=0, weights=[0.9, 0.1])
        for _ in range(20):
            s.draw(256)
        state = s.state_dict()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, len(json.dumps({k: v for k, v in state.items() if k in ("cursor", "epoch", "sizes")}))
    small, big = peak(1000), peak(10**12)
    assert big[0] < small[0] + 64 * 1024 and big[1] < small[1] + 64


def test_keep_masks_are_bitsets_and_old_bool_states_load():
    s = DataAwareSampler([1000, 10], seed=2, weights=[1.0, 0.0])
    keep = torch.zeros(1000, dtype=torch.bool)
    keep[::7] = True
    s.set_keep_mask(0, keep)
    state = s.state_dict()
    assert state["keep"][0].dtype == torch.uint8 and state["keep"][0].numel() == 125
    assert torch.equal(s.keep_mask(0), keep) and s.keep[1] is None
    old = dict(state, keep=[keep.clone(), None])          # a checkpoint written before masks were packed
    a, b = DataAwareSampler([1000, 10]), DataAwareSampler([1000, 10])
    a.load_state_dict(state)
    b.load_state_dict(old)
    assert torch.equal(a.draw(300), b.draw(300))
    assert set(s.local_index(s.draw(143)).tolist()) == set(range(0, 1000, 7))
