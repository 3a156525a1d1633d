"""Per-token -> per-sample loss -> weighted scalar (dataflex.loss), checked against a per-sample loop."""
import pytest
import torch
import torch.nn.functional as F

from dataflex.loss import (LossWrapper, per_sample_from_token_loss, per_sample_loss, per_token_loss,
                           weighted_mean)


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


def test_loss_wrapper_uniform_weights_is_exactly_the_mean(tiny_model, batch_builder):
    batch = batch_builder()
    logits = model_logits(tiny_model, batch)
    per_sample = per_sample_loss(logits, batch["labels"], batch["loss_mask"])
    plain = LossWrapper()(logits, batch)
    ones = LossWrapper(weigh=lambda l, b: torch.ones_like(l))(logits, batch)
    nones = LossWrapper(weigh=lambda l, b: None)(logits, batch)
    assert plain.item() == per_sample.mean().item()
    assert ones.item() == per_sample.mean().item()
    assert nones.item() == per_sample.mean().item()
    (ga,) = torch.autograd.grad(plain, logits, retain_graph=True)
    (gb,) = torch.autograd.grad(ones, logits, retain_graph=True)
    assert torch.equal(ga, gb)


def test_loss_wrapper_weighted_reduce(tiny_model, batch_builder):
    batch = batch_builder()
    B = batch["input_ids"].shape[0]
    w = torch.tensor([0.5, 2.0, 1.5, 0.0, 1.0, 1.0])
    seen = {}

    def weigh(per_sample, b):
        seen["loss"], seen["requires_grad"], seen["batch"] = per_sample, per_sample.requires_grad, b
        return w

    wrapper = LossWrapper(weigh=weigh)
    logits = model_logits(tiny_model, batch)
    loss = wrapper(logits, batch)
    per_sample = per_sample_loss(logits, batch["labels"], batch["loss_mask"])
    torch.testing.assert_close(loss, (w * per_sample).sum() / B, rtol=1e-6, atol=0)
    # the reweighter sees detached losses of this batch
    assert seen["requires_grad"] is False and seen["batch"] is batch
    torch.testing.assert_close(seen["loss"], per_sample.detach())
    # gradient of the scalar is sum_i (w_i / B) * grad l_i
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad((w * per_sample).sum() / B, logits)
    torch.testing.assert_close(g, g_ref)
    # a zero-weight sample contributes no gradient
    assert g[3].abs().max() == 0
    # the record of the step
    assert torch.equal(wrapper.last["loss"], per_sample.detach())
    assert torch.equal(wrapper.last["sample_id"], batch["sample_id"])
    assert torch.equal(wrapper.last["domain"], batch["domain"])
    assert torch.equal(wrapper.last["weight"], w)


def test_from_token_loss_matches_logits_entry(tiny_model, batch_builder):
    batch = batch_builder()
    w = torch.linspace(0.5, 1.5, 6)
    wrapper = LossWrapper(weigh=lambda l, b: w)
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
