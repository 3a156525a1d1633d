"""DoReMi (spec section 4): the excess loss, the update, and the tiny-LM check (e): with a reference
trained on uniform data, the learnable domain C gains weight, unlearnable B and easy A do not."""
import pytest
import torch
from conftest import roundtrip, synthetic_domains, tiny_gpt, train_steps

from dataflex.grad.interface import TorchInterface
from dataflex.mixers.doremi import DoReMiMixer, doremi_update, excess_loss
from dataflex.session.flex import DataFlex


def test_excess_loss_clips_at_zero_and_keeps_absent_domains():
    tok = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.5, 9.0], [4.0, 4.0, 4.0]])
    ref = torch.tensor([[1.0, 2.0, 2.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    domains = torch.tensor([0, 0, 2])
    previous = torch.tensor([0.0, 7.0, 0.0], dtype=torch.float64)
    got = excess_loss(tok, ref, mask, domains, previous)
    # domain 0: (2 + 0 + 0 + 0 + 0) / 5 label tokens; domain 1 absent: kept; domain 2: 3 each
    assert got.tolist() == [pytest.approx(2 / 5), 7.0, pytest.approx(3.0)]


def test_update_formula_and_smoothing_floor():
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    lam = torch.tensor([0.1, 2.0, 0.0], dtype=torch.float64)
    e = alpha * torch.exp(lam)
    expected = 0.999 * e / e.sum() + 0.001 / 3
    torch.testing.assert_close(doremi_update(alpha, lam, eta=1.0, smoothing=1e-3), expected)
    a = alpha
    for _ in range(200):   # one domain's excess dominates for long: the others never fall below c/K
        a = doremi_update(a, torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64), 1.0, 1e-3)
    assert a.min() >= 1e-3 / 3 - 1e-15 and a.sum().item() == pytest.approx(1.0)


train = train_steps


def test_tiny_lm_upweights_the_learnable_domain_only():
    domains = synthetic_domains(n_per_domain=48)            # A periodic, B random, C a learnable rule
    reference = tiny_gpt(seed=1)
    train(DataFlex(domains, 24, seed=1), reference, 40)      # sizes are equal: uniform reference weights
    proxy = tiny_gpt(seed=2)
    mixer = DoReMiMixer(reference=reference, reference_weights="uniform", eta=1.0, smoothing=1e-3)
    flex = DataFlex(domains, 24, [mixer], interface=TorchInterface(proxy), seed=2)
    train(flex, proxy, 40)
    avg = mixer.average()
    A, B, C = avg.tolist()
    assert C > 1 / 3 and C > A and C > B, avg         # C is upweighted
    assert B <= 1 / 3, avg                             # B is not: the reference is as bad on noise
    assert A <= 1 / 3, avg
    # the loss weights are alpha / alpha_ref over draws from alpha_ref (apply=loss)
    s = flex.state
    torch.testing.assert_close(s.domain_weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert s.domain_loss_weights is not None
    exported = flex.finish()["mixture.json"]
    assert list(exported) == ["A", "B", "C"] and sum(exported.values()) == pytest.approx(1.0)
    # state saves and restores exactly
    other = DoReMiMixer(reference=reference)
    other.load_state_dict(roundtrip(mixer.state_dict()))
    assert torch.equal(other.alpha, mixer.alpha) and torch.equal(other.average(), mixer.average())


def test_doremi_needs_a_reference():
    with pytest.raises(ValueError, match="mixer.reference=RUN_DIR"):
        DoReMiMixer()
