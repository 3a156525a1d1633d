"""MinHashDedup's decision against the exact Jaccard of planted pairs spread over 0.6-0.95: LSH banded
for a lower threshold than the decision one finds the pairs above it, the verification keeps the pairs
below it. The banding tuned at the threshold (datasketch's default) is shown to miss pairs above it."""
import pytest

from dataprep.document import Document
from dataprep.steps.minhash_dedup import MinHashDedup, _LSHIndex, candidate_probability, lsh_bands
from dataprep.testing import planted_pairs

PAIRS = planted_pairs(240, 0.6, 0.95, n_words=150, seed=7)


def removed_copies(step_or_index, pairs=PAIRS, step=None):
    """Which copies are dropped: all originals first, then the copies in pair order."""
    docs = [Document(a, f"a{i}", {"domain": "d"}) for i, (a, _, _) in enumerate(pairs)]
    docs += [Document(b, f"b{i}", {"domain": "d"}) for i, (_, b, _) in enumerate(pairs)]
    if isinstance(step_or_index, MinHashDedup):
        kept = {d.id for d in step_or_index.run(docs)}
    else:
        index, kept = step_or_index, set()
        for d in docs:
            if index.check_and_add(d.id, step.signature(d)) is None:
                kept.add(d.id)
    assert all(f"a{i}" in kept for i in range(len(pairs)))            # originals are all distinct
    return [f"b{i}" not in kept for i in range(len(pairs))]


def test_planted_pairs_spread_over_the_range():
    js = [j for _, _, j in PAIRS]
    assert min(js) < 0.62 and max(js) > 0.93
    assert sum(j >= 0.8 for j in js) > 80 and sum(j < 0.8 for j in js) > 80


@pytest.mark.parametrize("threshold", [0.7, 0.8, 0.85])
def test_exact_verification_removes_above_and_keeps_below(threshold):
    step = MinHashDedup(threshold=threshold, num_perm=128)
    removed = removed_copies(step)
    above = [r for r, (_, _, j) in zip(removed, PAIRS) if j >= threshold]
    below = [r for r, (_, _, j) in zip(removed, PAIRS) if j < threshold]
    assert len(above) > 20 and len(below) > 20
    assert all(above), f"missed {above.count(False)} of {len(above)} pairs at or above {threshold}"
    assert not any(below), f"removed {sum(below)} of {len(below)} pairs below {threshold}"


def test_minhash_verification_is_right_away_from_the_threshold():
    """The estimate's standard deviation is sqrt(J (1 - J) / 128), 0.029 at J = 0.88 and 0.041 at 0.7:
    from about 2.5 of them away (J >= 0.88, J <= 0.7) the decision is right; nearer the threshold it is
    soft (pairs on both sides go either way)."""
    step = MinHashDedup(threshold=0.8, num_perm=128, verify="minhash")
    removed = removed_copies(step)
    far_above = [r for r, (_, _, j) in zip(removed, PAIRS) if j >= 0.88]
    far_below = [r for r, (_, _, j) in zip(removed, PAIRS) if j <= 0.70]
    assert len(far_above) > 10 and all(far_above)
    assert len(far_below) > 50 and not any(far_below)


def test_banding_at_the_threshold_misses_pairs_above_it():
    """What the lower band threshold repairs: datasketch's banding for 0.8 (b = 9, r = 13) with the same
    exact verification misses pairs above the threshold."""
    from datasketch import MinHashLSH
    step = MinHashDedup(threshold=0.8, num_perm=128)
    default = MinHashLSH(threshold=0.8, num_perm=128)
    removed = removed_copies(_LSHIndex(0.8, 128, 1, (default.b, default.r), "exact"), step=step)
    above = [r for r, (_, _, j) in zip(removed, PAIRS) if j >= 0.8]
    assert above.count(False) >= 5


@pytest.mark.parametrize("threshold,num_perm,recall", [(0.8, 128, 0.999), (0.7, 128, 0.99), (0.9, 256, 0.9999),
                                                       (0.5, 64, 0.999)])
def test_bands_reach_the_recall_with_the_most_rows(threshold, num_perm, recall):
    b, r = lsh_bands(threshold, num_perm, recall)
    assert b == num_perm // r and candidate_probability(threshold, b, r) >= recall
    assert all(candidate_probability(threshold, num_perm // k, k) < recall for k in range(r + 1, num_perm + 1))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="verify"):
        MinHashDedup(verify="bloom")
    with pytest.raises(ValueError, match="no LSH banding"):
        MinHashDedup(threshold=0.3, num_perm=4, recall=0.999999)
