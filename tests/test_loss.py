"""Per-token -> per-sample loss -> weighted scalar (dataflex.core.loss), checked against a per-sample loop."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt

from dataflex.core.loss import (
    LossWrapper,
    per_sample_from_token_loss,
    per_sample_loss,
    per_token_loss,
    reduce_loss,
    weighted_mean,
)


def loop_losses(model, batch):
    """Reference: each sample alone through the model, without its padding, mean CE over label tokens."""
    out = []
    for i, n in enumerate(batch["lengths"].tolist()):
        ids = batch["input_ids"][i:i + 1, :n]
        logits = model(ids, position_ids=torch.arange(n).unsqueeze(0))[0]
        ce = F.cross_entropy(logits, batch["labels"][i, :n], reduction="none")
        m = batch["loss_mask"][i, :n].bool()
        out.append(ce[m].mean())
    return torch.stack(out)


def model_logits(model, batch):
    return model(batch["input_ids"], position_ids=batch["position_ids"])


def test_per_token_loss_is_cross_entropy_at_every_position(tiny_model, batch_builder):
    batch = batch_builder()
    logits = model_logits(tiny_model, batch)
    tok = per_token_loss(logits, batch["labels"])
    assert tok.shape == batch["labels"].shape
    manual = -logits.log_softmax(-1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(tok, manual, rtol=1e-6, atol=1e-6)


def test_per_sample_loss_equals_single_sample_loop(tiny_model, batch_builder):
    batch = batch_builder()
    with torch.no_grad():
        got = per_sample_loss(model_logits(tiny_model, batch), batch["labels"], batch["loss_mask"])
        ref = loop_losses(tiny_model, batch)
    assert got.shape == (len(batch["lengths"]),)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the mask matters: for a prompted sample the mean over all its real tokens is a different number
    with torch.no_grad():
        n = int(batch["lengths"][1])
        logits = tiny_model(batch["input_ids"][1:2, :n], position_ids=torch.arange(n).unsqueeze(0))[0]
        unmasked = F.cross_entropy(logits, batch["labels"][1, :n])
    assert abs(unmasked.item() - got[1].item()) > 1e-3


def test_padding_and_masked_labels_do_not_change_the_loss(tiny_model, batch_builder):
    batch = batch_builder()
    with torch.no_grad():
        base = per_sample_loss(model_logits(tiny_model, batch), batch["labels"], batch["loss_mask"])
        g = torch.Generator().manual_seed(5)
        noisy = dict(batch)
        pad = torch.arange(16).unsqueeze(0) >= batch["lengths"].unsqueeze(1)
        noisy["input_ids"] = torch.where(pad, torch.randint(1, 64, pad.shape, generator=g), batch["input_ids"])
        masked = batch["loss_mask"] == 0
        noisy["labels"] = torch.where(masked, torch.randint(0, 64, masked.shape, generator=g), batch["labels"])
        again = per_sample_loss(model_logits(tiny_model, noisy), noisy["labels"], noisy["loss_mask"])
    torch.testing.assert_close(again, base, rtol=1e-6, atol=1e-6)


def test_mask_selects_tokens_exactly():
    tok = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    out = per_sample_from_token_loss(tok, mask)
    # sample without any label token: loss 0 as documented, never NaN
    assert out.tolist() == [2.5, 10.0, 0.0]
    # boolean masks work the same
    assert per_sample_from_token_loss(tok, mask.bool()).tolist() == [2.5, 10.0, 0.0]


def token_mean_loop(model, batch):
    """The standard loop: one F.cross_entropy over every label token of the batch (HF, Megatron)."""
    logits = model_logits(model, batch)
    labels = torch.where(batch["loss_mask"].bool(), batch["labels"], -100)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_token_reduction_is_the_standard_token_mean_loss_and_gradient(batch_builder):
    batch = batch_builder()
    model_a, model_b = tiny_gpt(), tiny_gpt()
    ref = token_mean_loop(model_a, batch)
    got = LossWrapper()(model_logits(model_b, batch), batch)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    ref.backward()
    got.backward()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8, msg=name)
    # and it is not the mean of per-sample means: short samples would weigh more
    with torch.no_grad():
        per_sample = per_sample_loss(model_logits(model_a, batch), batch["labels"], batch["loss_mask"])
    assert abs(per_sample.mean().item() - got.item()) > 1e-3


def test_sample_reduction_uniform_weights_is_exactly_the_mean(tiny_model, batch_builder):
    batch = batch_builder()
    logits = model_logits(tiny_model, batch)
    per_sample = per_sample_loss(logits, batch["labels"], batch["loss_mask"])
    plain = LossWrapper(reduction="sample")(logits, batch)
    ones = LossWrapper(weigh=lambda s, b: {"sample_weights": torch.ones_like(s["loss"])},
                       reduction="sample")(logits, batch)
    nones = LossWrapper(weigh=lambda s, b: None, reduction="sample")(logits, batch)
    torch.testing.assert_close(plain, per_sample.mean(), rtol=1e-6, atol=0)
    assert ones.item() == plain.item() == nones.item()
    (ga,) = torch.autograd.grad(plain, logits, retain_graph=True)
    (gb,) = torch.autograd.grad(ones, logits, retain_graph=True)
    assert torch.equal(ga, gb)
    with pytest.raises(ValueError, match="loss reduction must be one of"):
        LossWrapper(reduction="mean")


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_loss_wrapper_weighted_reduce(tiny_model, batch_builder, reduction):
    batch = batch_builder()
    w = torch.tensor([0.5, 2.0, 1.5, 0.0, 1.0, 1.0])
    seen = {}

    def weigh(signal, b):
        seen.update(signal=signal, batch=b)
        return {"sample_weights": w}

    wrapper = LossWrapper(weigh=weigh, reduction=reduction)
    logits = model_logits(tiny_model, batch)
    loss = wrapper(logits, batch)
    per_sample = per_sample_loss(logits, batch["labels"], batch["loss_mask"])
    n = batch["loss_mask"].sum(-1)
    expected = (w * n * per_sample).sum() / (w * n).sum() if reduction == "token" else (w * per_sample).sum() / w.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # plugins see detached losses and token counts of this batch
    assert not seen["signal"]["loss"].requires_grad and seen["batch"] is batch
    torch.testing.assert_close(seen["signal"]["loss"], per_sample.detach())
    assert torch.equal(seen["signal"]["tokens"], n)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g, g_ref)
    assert g[3].abs().max() == 0          # a zero-weight sample contributes no gradient
    # scaling every weight changes nothing: the reduction normalises by the weights' total
    scaled = LossWrapper(weigh=lambda s, b: {"sample_weights": 7 * w}, reduction=reduction)(logits, batch)
    torch.testing.assert_close(scaled, loss, rtol=1e-6, atol=0)
    assert torch.equal(wrapper.last["loss"], per_sample.detach())
    assert torch.equal(wrapper.last["sample_id"], batch["sample_id"])
    assert torch.equal(wrapper.last["weight"], w)


def test_token_weights_and_global_denominator():
    tok = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    u = torch.tensor([[1.0, 0.0, 2.0, 5.0], [1.0, 1.0, 0.0, 1.0]])
    # token: sum(u m l) / sum(u m) = (1 + 6 + 20 + 40) / (1 + 2 + 1 + 1)
    assert reduce_loss(tok, mask, token_weights=u).item() == pytest.approx(67 / 5)
    # sample: per-sample token-weighted means (7/3 and 60/2), then their mean
    assert reduce_loss(tok, mask, token_weights=u, reduction="sample").item() == pytest.approx((7 / 3 + 30) / 2)
    # a global denominator replaces the local one (data parallelism)
    assert reduce_loss(tok, mask, denominator=torch.tensor(10.0)).item() == pytest.approx((6 + 90) / 10)


def test_non_finite_token_losses_weigh_zero_and_never_make_nan():
    tok = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 2.0, 2.0], [float("nan")] * 3], requires_grad=True)
    mask = torch.ones(3, 3)
    for reduction, expected in (("token", (1 + 3 + 2 + 2) / 4), ("sample", (2 + 2) / 3)):
        loss = reduce_loss(tok, mask, reduction=reduction)
        assert loss.item() == pytest.approx(expected)
        (g,) = torch.autograd.grad(loss, tok)
        assert torch.isfinite(g).all()
        assert g[0, 1] == 0 and g[1, 0] == 0 and (g[2] == 0).all()
    wrapper = LossWrapper()
    wrapper.from_token_loss(tok, {"loss_mask": mask})
    assert wrapper.last["loss"][:2].tolist() == [2.0, 2.0] and wrapper.last["loss"][2].isnan()


def test_hf_style_outputs_are_unwrapped(tiny_model, batch_builder):
    class Out:
        def __init__(self, logits):
            self.logits = logits
    batch = batch_builder()
    logits = model_logits(tiny_model, batch)
    assert LossWrapper()(Out(logits), batch).item() == LossWrapper()(logits, batch).item()


def test_from_token_loss_matches_logits_entry(tiny_model, batch_builder):
    batch = batch_builder()
    w = torch.linspace(0.5, 1.5, 6)
    wrapper = LossWrapper(weigh=lambda s, b: {"sample_weights": w})
    logits = model_logits(tiny_model, batch)
    a = wrapper(logits, batch)
    b = wrapper.from_token_loss(per_token_loss(logits, batch["labels"]), batch)
    assert a.item() == b.item()


def test_weighted_mean_formula():
    l = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert weighted_mean(l, None).item() == 2.5
    assert weighted_mean(l, torch.tensor([4.0, 0.0, 0.0, 0.0])).item() == 1.0
    w = torch.tensor([0.1, 0.2, 0.3, 3.4], dtype=torch.float64)
    torch.testing.assert_close(weighted_mean(l, w), (w.float() * l).sum() / 4)
    assert weighted_mean(l, w).dtype == l.dtype
