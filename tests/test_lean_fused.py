"""The lean loss with its gradients formed in the forward (`grad_hint`, dataflex.core.lean_loss).

When the weights are known before the forward (no plugin, the mixer's loss weights, weights given as
tensors, the global denominator), the chunked loss forms the hidden states' and the head's gradients
while it computes the losses and its backward only scales them. Every check is against the logits path
(`F.cross_entropy` on the head's output, `reduce_loss`): per-token losses, the weighted scalar and the
gradients, fp32 to 1e-5; and it checks which backward ran: the forward's gradients when the upstream
gradient is a multiple of the hint, a recomputation (exact) when it is not: the caller also backpropagates
through the per-token losses, weighs by them, or the hint is wrong.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bf16_grads_close, build_batch, tiny_gpt

import dataflex.core.lean_loss as lean_module
from dataflex.core.lean_loss import LeanOutput, linear_cross_entropy
from dataflex.core.loss import LossWrapper, loss_grad_hint, per_token_loss, reduce_loss


@pytest.fixture
def recomputed(monkeypatch):
    """How many backward calls recomputed the logits (the real function, counted)."""
    calls = []
    real = lean_module._recompute_backward
    monkeypatch.setattr(lean_module, "_recompute_backward", lambda *a: calls.append(1) or real(*a))
    return calls


def grads_of(hidden, head):
    return {"hidden": hidden.grad.detach().clone(),
            **{n: p.grad.detach().clone() for n, p in head.named_parameters() if p.grad is not None}}


def assert_close_dict(got, ref, rtol=1e-5, atol=1e-6):
    assert got.keys() == ref.keys() and got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def problem(bias=False, N=37, H=16, V=50, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=bias)
    labels = torch.randint(0, V, (N,))
    labels[[3, 20]] = -100
    return hidden, head, labels


def reference(hidden, head, labels, scalar_of):
    """Loss and gradients of `scalar_of(per-token losses)` on the logits path."""
    tok = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    scalar_of(tok).backward()
    ref = grads_of(hidden, head)
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    return tok.detach(), ref


# ------------------------------------------------------------------------------- the function itself

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_hinted_gradients_equal_cross_entropy_without_recomputation(bias, chunk, recomputed):
    hidden, head, labels = problem(bias)
    upstream = torch.rand(len(labels), generator=torch.Generator().manual_seed(1)) * 3
    ref_tok, ref = reference(hidden, head, labels, lambda t: (t * upstream).sum() / 4.2)
    tok = linear_cross_entropy(hidden, head, labels, chunk_size=chunk, grad_hint=upstream * 0.37)
    torch.testing.assert_close(tok, ref_tok, rtol=1e-5, atol=1e-5)
    ((tok * upstream).sum() / 4.2).backward()
    assert_close_dict(grads_of(hidden, head), ref)
    assert not recomputed


@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_hinted_with_one_side_frozen(frozen, recomputed):
    """A frozen head (LoRA: the hidden states' gradient only) or fixed hidden states (the head's only)."""
    hidden, head, labels = problem(bias=True)
    if frozen == "head":
        head.requires_grad_(False)
    else:
        hidden.requires_grad_(False)
    upstream = torch.rand(len(labels), generator=torch.Generator().manual_seed(2))
    tok = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    (tok * upstream).sum().backward()
    ref = hidden.grad.clone() if frozen == "head" else head.weight.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None
    (linear_cross_entropy(hidden, head, labels, grad_hint=upstream) * upstream).sum().backward()
    got = hidden.grad if frozen == "head" else head.weight.grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not recomputed


def test_backprop_through_the_losses_themselves_recomputes(recomputed):
    """A scalar built from the per-token losses beyond the hinted weights (a loss-dependent term, as a
    reweighter that backpropagates through its weights would): the gradient is not a multiple of the hint;
    the backward sees it and recomputes, exactly."""
    hidden, head, labels = problem()
    w = torch.rand(len(labels), generator=torch.Generator().manual_seed(3))

    def scalar(t):
        return (t * w).sum() + 0.1 * (t ** 2).sum()
    _, ref = reference(hidden, head, labels, scalar)
    scalar(linear_cross_entropy(hidden, head, labels, grad_hint=w)).backward()
    assert_close_dict(grads_of(hidden, head), ref)
    assert len(recomputed) == 1


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_weights_from_each_token_own_loss_are_formed_in_the_forward(gamma, chunk, recomputed):
    """Focal's token weights (1 - exp(-l))^gamma, a function of each token's own loss, under the token mean
    sum_t s_t w_t l_t / sum_t s_t w_t (weights detached): given as `hint_of_loss` beside the known sample
    weights, the forward weighs each chunk's hint once its losses are complete and forms the gradients; the
    loss-dependent normaliser is the one scalar. Equal to the logits path, no recomputation."""
    from dataflex.reweighters.focal import focal_weights
    hidden, head, labels = problem(bias=True)
    s = torch.rand(len(labels), generator=torch.Generator().manual_seed(5)) + 0.5     # sample weights, known
    mask = (labels != -100).float()

    def scalar(t):
        w = focal_weights(t.detach(), gamma).float() * s * mask
        return (w * t).sum() / w.sum()
    ref_tok, ref = reference(hidden, head, labels, scalar)
    tok = linear_cross_entropy(hidden, head, labels, chunk_size=chunk, grad_hint=s * mask,
                               hint_of_loss=lambda l: focal_weights(l, gamma))
    torch.testing.assert_close(tok, ref_tok, rtol=1e-5, atol=1e-5)
    scalar(tok).backward()
    assert_close_dict(grads_of(hidden, head), ref)
    assert not recomputed


def test_a_wrong_function_of_the_loss_recomputes(recomputed):
    """`hint_of_loss` that is not the function the caller weighs by: the backward sees it and recomputes."""
    from dataflex.reweighters.focal import focal_weights
    hidden, head, labels = problem()
    mask = (labels != -100).float()

    def scalar(t):
        w = focal_weights(t.detach(), 2.0).float() * mask
        return (w * t).sum()
    _, ref = reference(hidden, head, labels, scalar)
    scalar(linear_cross_entropy(hidden, head, labels, grad_hint=mask,
                                hint_of_loss=lambda l: focal_weights(l, 1.0))).backward()
    assert_close_dict(grads_of(hidden, head), ref)
    assert len(recomputed) == 1


@pytest.mark.parametrize("wrong", ["one_token", "masked_token", "uniform"])
def test_a_wrong_hint_recomputes(wrong, recomputed):
    hidden, head, labels = problem()
    w = torch.rand(len(labels), generator=torch.Generator().manual_seed(4)) + 0.5
    hint = w.clone()
    if wrong == "one_token":
        hint[5] *= 1.001                     # off by 0.1% on one token
    elif wrong == "masked_token":
        hint[7] = 0.0                        # the caller sends a gradient where the hint says none
    else:
        hint = torch.ones_like(w)
    _, ref = reference(hidden, head, labels, lambda t: (t * w).sum())
    (linear_cross_entropy(hidden, head, labels, grad_hint=hint) * w).sum().backward()
    assert_close_dict(grads_of(hidden, head), ref)
    assert len(recomputed) == 1


def test_a_second_backward_recomputes(recomputed):
    """The forward's gradients are scaled in place by the first backward; a retained graph's second
    backward recomputes and adds the same gradients again."""
    hidden, head, labels = problem()
    _, ref = reference(hidden, head, labels, lambda t: t.sum())
    loss = linear_cross_entropy(hidden, head, labels, grad_hint=torch.ones(len(labels))).sum()
    loss.backward(retain_graph=True)
    assert_close_dict(grads_of(hidden, head), ref)
    loss.backward()
    assert_close_dict(grads_of(hidden, head), {k: 2 * v for k, v in ref.items()})
    assert len(recomputed) == 1


def test_hint_shape_is_checked():
    hidden, head, labels = problem()
    with pytest.raises(ValueError, match="grad_hint"):
        linear_cross_entropy(hidden, head, labels, grad_hint=torch.ones(len(labels) - 1))


# ------------------------------------------------------------------------------ through LossWrapper

def tied_gpt():
    model = tiny_gpt()
    model.head.weight = model.tok_emb.weight
    return model


def fixed_weights(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = batch["labels"].shape
    return {"sample_weights": torch.rand(B, generator=g) + 0.25, "token_weights": torch.rand(B, T, generator=g) * 2,
            "denominator": torch.tensor(7.5)}


def run(make, batch, lean, reduction, answer, known):
    model = make()
    wrapper = LossWrapper(weigh=None if answer is None else (lambda signal, b: answer), reduction=reduction)
    if known:
        wrapper.known_weights = lambda b: answer
    out = model(batch["input_ids"], position_ids=batch["position_ids"], lean=lean)
    loss = wrapper(out, batch)
    loss.backward()
    return loss.detach(), wrapper.last["loss"], {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}


@pytest.mark.parametrize("chunking", [None, "5x16"])
@pytest.mark.parametrize("reduction", ["token", "sample"])
@pytest.mark.parametrize("make", [tiny_gpt, tied_gpt], ids=["untied", "tied"])
@pytest.mark.parametrize("weights", ["none", "known"])
def test_tinygpt_hinted_lean_equals_logits(weights, make, reduction, chunking, recomputed, monkeypatch):
    """No plugin (every weight 1) and weights known before the losses (sample and token weights, a global
    denominator): the lean path forms its gradients in the forward, equal to the logits path's."""
    if chunking:
        monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", chunking)
    batch = build_batch()
    answer = None if weights == "none" else fixed_weights(batch)
    ref = run(make, batch, False, reduction, answer, False)
    got = run(make, batch, True, reduction, answer, weights == "known")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert_close_dict(got[2], ref[2])
    assert not recomputed


def test_weights_from_the_losses_recompute(recomputed):
    """A reweighter that weighs by the step's losses (focal-like): no hint is known, the backward recomputes;
    a `known_weights` that guesses wrong recomputes too; both exact."""
    batch = build_batch()

    def focal(signal, b):
        return {"token_weights": (1 - torch.exp(-signal["token_loss"])) ** 2}
    results = []
    for lean, known in ((False, None), (True, None), (True, lambda b: {})):
        model = tiny_gpt()
        wrapper = LossWrapper(weigh=focal)
        wrapper.known_weights = known
        wrapper(model(batch["input_ids"], position_ids=batch["position_ids"], lean=lean), batch).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert_close_dict(results[1], results[0])
    assert_close_dict(results[2], results[0])
    assert len(recomputed) == 2


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_non_finite_tokens_with_a_hint(reduction, recomputed):
    """NaN hidden states on some label tokens: weight 0 and exact zero gradient as without a hint. Token
    reduction keeps the forward's gradients (the others' weights are unchanged up to the denominator);
    under sample reduction the NaN changes its sample's normaliser, and the backward recomputes."""
    torch.manual_seed(0)
    batch = build_batch()
    model = tiny_gpt()
    with torch.no_grad():
        base = model(batch["input_ids"], position_ids=batch["position_ids"], lean=True).hidden
    broken = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
    broken[0, 3] = broken[2, 4] = True
    hidden = base.clone().masked_fill(broken.unsqueeze(-1), float("nan")).requires_grad_(True)
    answer = fixed_weights(batch)
    wrapper = LossWrapper(weigh=lambda s, b: answer, reduction=reduction)
    wrapper.known_weights = lambda b: answer
    loss = wrapper(hidden=hidden, head=model.head, batch=batch)
    loss.backward()
    got = {"hidden": hidden.grad.clone(), "head": model.head.weight.grad.clone()}
    model.head.weight.grad = None
    clean = base.clone().masked_fill(broken.unsqueeze(-1), 0.0).requires_grad_(True)
    masked = dict(batch, loss_mask=batch["loss_mask"] * (~broken))
    ref_loss = LossWrapper(weigh=lambda s, b: answer, reduction=reduction)(model.head(clean), masked)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_close_dict(got, {"hidden": clean.grad, "head": model.head.weight.grad})
    assert (got["hidden"][broken] == 0).all()
    assert len(recomputed) == (0 if reduction == "token" else 1)


def packed_batch(vocab=64, seed=0):
    """Two rows of 16 slots holding 5 samples (lengths 7, 5, 4 | 10, 6), some prompt tokens masked."""
    g = torch.Generator().manual_seed(seed)
    rows = [[7, 5, 4], [10, 6]]
    R, T, S = 2, 16, 5
    segment_ids = torch.full((R, T), -1)
    position_ids = torch.zeros(R, T, dtype=torch.long)
    loss_mask = torch.zeros(R, T)
    sid = 0
    for r, lengths in enumerate(rows):
        col = 0
        for n in lengths:
            segment_ids[r, col:col + n] = sid
            position_ids[r, col:col + n] = torch.arange(n)
            loss_mask[r, col + 1:col + n] = 1.0        # the first token of each sample is a prompt token
            col, sid = col + n, sid + 1
    return {"input_ids": torch.randint(1, vocab, (R, T), generator=g),
            "labels": torch.randint(1, vocab, (R, T), generator=g), "loss_mask": loss_mask,
            "segment_ids": segment_ids, "position_ids": position_ids, "sample_id": torch.arange(S),
            "domain": torch.zeros(S, dtype=torch.long)}


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_packed_rows_hinted_equal_logits(reduction, recomputed):
    batch = packed_batch()
    g = torch.Generator().manual_seed(5)
    answer = {"sample_weights": torch.rand(5, generator=g) + 0.1, "token_weights": torch.rand(5, 16, generator=g)}
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, 24, requires_grad=True)
    head = torch.nn.Linear(24, 64, bias=False)
    hint = loss_grad_hint(batch["loss_mask"], answer["sample_weights"], answer["token_weights"], reduction,
                          lean_segments(batch))
    assert hint.shape == (2, 16) and (hint[batch["loss_mask"] == 0] == 0).all()
    ref_w = LossWrapper(weigh=lambda s, b: answer, reduction=reduction)
    ref_loss = ref_w(head(hidden), batch)
    ref_loss.backward()
    ref = grads_of(hidden, head)
    hidden.grad = head.weight.grad = None
    wrapper = LossWrapper(weigh=lambda s, b: answer, reduction=reduction)
    wrapper.known_weights = lambda b: answer
    loss = wrapper(LeanOutput(hidden, head), batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wrapper.last["loss"], ref_w.last["loss"], rtol=1e-5, atol=1e-6)
    assert_close_dict(grads_of(hidden, head), ref)
    assert not recomputed


def lean_segments(batch):
    from dataflex.core.packing import Segments
    return Segments.of(batch)


def test_hint_is_the_reduction_gradient():
    """loss_grad_hint is d reduce_loss / d token_loss up to one factor (autograd of reduce_loss, independently)."""
    batch = build_batch()
    answer = fixed_weights(batch)
    for reduction in ("token", "sample"):
        tok = torch.rand(batch["labels"].shape, requires_grad=True)
        reduce_loss(tok, batch["loss_mask"], answer["sample_weights"], answer["token_weights"], reduction,
                    answer["denominator"]).backward()
        hint = loss_grad_hint(batch["loss_mask"], answer["sample_weights"], answer["token_weights"], reduction)
        torch.testing.assert_close(tok.grad * 7.5, hint, rtol=1e-6, atol=0)


def test_bf16_hinted_within_bf16_precision(recomputed):
    batch = build_batch()
    results = []
    for lean in (False, True):
        model = tiny_gpt().to(torch.bfloat16)
        loss = LossWrapper()(model(batch["input_ids"], position_ids=batch["position_ids"], lean=lean), batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-3)
    assert_bf16_grads_close(g0, g1)
    assert not recomputed


def test_per_token_loss_passes_the_hint(recomputed):
    hidden, head, labels = problem()
    w = torch.rand(len(labels))
    tok = per_token_loss(labels=labels.unsqueeze(0), hidden=hidden.unsqueeze(0), head=head,
                         grad_hint=w.unsqueeze(0))
    (tok.squeeze(0) * w).sum().backward()
    assert not recomputed


def loop_params(plugins: str, packing: bool = False, micro_rows=None) -> list:
    """The parameters after two SGD steps of a DataFlex loop over TinyGPT, on the logits path and on the lean path;
    each step fed to `flex.loss` whole, or in micro-batches of `micro_rows` rows (`slice_rows`)."""
    from conftest import synthetic_domains

    from dataflex.core.packing import slice_rows
    from dataflex.mixers import StaticMixer
    from dataflex.reweighters import FocalReweighter, LossReweighter
    from dataflex.session.flex import DataFlex

    params = []
    for lean in (False, True):
        model = tiny_gpt()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        chosen = {"none": [], "mixer_on_loss": [StaticMixer([1.0, 3.0, 0.5], apply="loss")],
                  "reweighter": [LossReweighter(burnout_steps=0)], "focal": [FocalReweighter()],
                  "focal_burnout": [FocalReweighter(burnout_steps=1)],
                  "mixer_and_focal": [StaticMixer([1.0, 3.0, 0.5], apply="loss"), FocalReweighter()],
                  "focal_sample_mean": [FocalReweighter()]}[plugins]
        flex = DataFlex(synthetic_domains(n_per_domain=8), global_batch_size=4, plugins=chosen, seed=0,
                        packing=packing, loss_reduction="sample" if plugins == "focal_sample_mean" else "token")
        for _ in range(2):
            batch = flex.next_batch()
            step = micro_rows or 4
            for r0 in range(0, 4, step):
                part = slice_rows(batch, r0, r0 + step) if micro_rows else batch
                out = model(part["input_ids"], position_ids=part["position_ids"], lean=lean)
                flex.loss(out, part).backward()
            opt.step()
            opt.zero_grad()
            flex.end_step()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return params


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("plugins", ["none", "mixer_on_loss", "reweighter", "focal", "focal_burnout", "mixer_and_focal",
                                     "focal_sample_mean"])
def test_session_lean_equals_logits_and_hints_when_it_can(plugins, packing, recomputed):
    """DataFlex's `flex.loss`: without plugins, with a mixer weighing the loss (weights known before the losses)
    and with focal's token weights (each a function of its own token's loss, under the token mean) the lean path
    forms its gradients in the forward; with a reweighter on the sample losses (weights from every loss), or focal
    under the sample mean (per-sample normalisers of the weights), it recomputes. Two training steps equal the
    logits path's either way."""
    params = loop_params(plugins, packing=packing)
    assert_close_dict(params[1], params[0], rtol=1e-5, atol=1e-6)
    assert len(recomputed) == (2 if plugins in ("reweighter", "focal_sample_mean") else 0)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("plugins", ["none", "mixer_on_loss"])
def test_micro_batches_of_a_loop_are_hinted(plugins, packing, recomputed):
    """A loop feeding each step to `flex.loss` in two micro-batches (gradient accumulation): the weights of each
    micro-batch are known before its forward (no plugin, or the mixer's loss weights), so the lean path forms its
    gradients there; the trained parameters equal the logits path fed the same way."""
    params = loop_params(plugins, packing=packing, micro_rows=2)
    assert_close_dict(params[1], params[0], rtol=1e-5, atol=1e-6)
    assert not recomputed


def test_hf_trainer_accumulation_hints_its_micro_batches(tmp_path, domains_builder, recomputed):
    """DataFlexTrainer with gradient accumulation weighs the whole batch first (a reweighter on its losses), so
    each micro-batch's weights are known before its forward: the lean path forms its gradients there, and the
    trained parameters equal the logits path's."""
    import transformers
    transformers.logging.set_verbosity_error()
    import dataflex
    from dataflex.integrations.hf_trainer import DataFlexTrainer
    from dataflex.reweighters import LossReweighter
    params = []
    for lean in (False, True):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, plugins=[LossReweighter(burnout_steps=0)],
                                 seed=0)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(lean)), max_steps=2, learning_rate=1e-2,
                                              gradient_accumulation_steps=2, per_device_train_batch_size=4,
                                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
        DataFlexTrainer(model=model, args=args, flex=flex, lean_loss=lean).train()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert_close_dict(params[1], params[0], rtol=1e-4, atol=1e-5)
    assert not recomputed
