"""The gradient engine on the lean path (dataflex.grad.factors.HeadFactor): ghost norms, dots, factored
projections and exact per-sample gradients with `TorchInterface(lean=True)` equal the logits path
(`lean=False`: the head's output gradient as a [B, T, V] tensor, exact gradients through torch.func),
fp32 to 1e-5; TinyGPT with tied and untied heads, a random-init HF Llama tied and untied, a head with
a bias; vocabulary chunks smaller than the vocabulary. And no [B, T, V] tensor is ever formed."""
from __future__ import annotations

import pytest
import torch
from conftest import build_batch, tiny_gpt
from torch.utils._python_dispatch import TorchDispatchMode

from dataflex.grad import FactoredProjector, TorchInterface
from dataflex.grad import ghost as ghost_module
from dataflex.grad.factors import HeadFactor
from dataflex.grad.ghost import capture

import transformers
transformers.logging.set_verbosity_error()


def tied_gpt():
    model = tiny_gpt()
    model.head.weight = model.tok_emb.weight
    return model


def biased_gpt():
    model = tiny_gpt()
    bias = torch.nn.Linear(32, 64).bias
    model.head.bias = torch.nn.Parameter(bias.detach() * 3)
    return model


def tiny_llama(tied: bool, vocab: int = 96):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                                   tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(cfg)


MODELS = {"gpt_untied": (tiny_gpt, 64), "gpt_tied": (tied_gpt, 64), "gpt_bias": (biased_gpt, 64),
          "llama_untied": (lambda: tiny_llama(False), 96), "llama_tied": (lambda: tiny_llama(True), 96)}


@pytest.fixture(params=[None, "4x7"], ids=["default_chunks", "vocab_chunks_of_7"])
def chunking(request, monkeypatch):
    if request.param:
        monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", request.param)
    return request.param


def head_name(model) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.head
    return next(n for n, p in model.named_parameters() if p is head.weight)


@pytest.mark.parametrize("name", list(MODELS))
def test_lean_capture_takes_the_head_factor(name, chunking):
    make, vocab = MODELS[name]
    model = make()
    batch = build_batch(vocab=vocab)
    run = capture(model, batch, lean=True, forward=TorchInterface(model).forward)
    parts = run.contributions[head_name(model)]
    assert any(isinstance(c, HeadFactor) for c in parts), "the lean path did not give the head a HeadFactor"
    assert not run.fallback                     # HF Llama's RMSNorms are hooked too
    ref = capture(model, batch, forward=TorchInterface(model).forward)
    assert not any(isinstance(c, HeadFactor) for c in ref.contributions[head_name(model)])
    for n in ref.shapes:                        # every parameter's per-sample gradient, the head's included
        torch.testing.assert_close(run.materialise(n), ref.materialise(n), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("params", ["all", "head"])
def test_lean_norms_and_dots_equal_the_logits_path(name, params, chunking):
    make, vocab = MODELS[name]
    model = make()
    batch = build_batch(vocab=vocab)
    spec = "all" if params == "all" else [head_name(model).replace(".", r"\.")]
    lean, full = TorchInterface(model), TorchInterface(model, lean=False)
    ref = full.per_sample_grad_norms(batch, spec)
    got = lean.per_sample_grad_norms(batch, spec, chunk_size=4)
    assert (ref > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    target = full.batch_grad(build_batch(vocab=vocab, seed=3), spec)
    g = torch.Generator().manual_seed(5)
    second = {k: torch.randn(v.shape, generator=g) for k, v in target.items()}
    both = {k: torch.stack([target[k], second[k]]) for k in target}
    for t in (target, both):
        ref_dots = full.per_sample_grad_dots(batch, t, spec)
        torch.testing.assert_close(lean.per_sample_grad_dots(batch, t, spec), ref_dots, rtol=1e-5, atol=1e-6)
    # the independent reference: exact per-sample gradients through torch.func on the logits path
    exact = full.per_sample_grads(batch, spec)
    torch.testing.assert_close(ref, exact.norms, rtol=1e-5, atol=1e-6)
    flat_target = torch.cat([target[n].flatten() for n in exact.grads])
    torch.testing.assert_close(lean.per_sample_grad_dots(batch, flat_target, spec), exact.flat() @ flat_target,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt_untied", "gpt_tied", "llama_tied"])
def test_lean_exact_and_projected_grads_equal_the_logits_path(name, chunking):
    make, vocab = MODELS[name]
    model = make()
    batch = build_batch(vocab=vocab)
    lean, full = TorchInterface(model), TorchInterface(model, lean=False)
    calls = []
    real = ghost_module.HeadFactor.row_chunks
    ghost_module.HeadFactor.row_chunks = lambda self: calls.append(1) or real(self)
    try:
        got = lean.per_sample_grads(batch, chunk_size=4)
    finally:
        ghost_module.HeadFactor.row_chunks = real
    assert calls, "exact per-sample gradients did not take the lean path"
    ref = full.per_sample_grads(batch)                  # torch.func over the logits
    assert got.grads.keys() == ref.grads.keys()
    for n in ref.grads:
        assert got.grads[n].dtype == ref.grads[n].dtype
        # fp32 to 1e-5 of the parameter's largest entry (sums over tokens in a different order than torch.func)
        torch.testing.assert_close(got.grads[n], ref.grads[n], rtol=1e-5, atol=1e-6 + 1e-5 * float(ref.grads[n].abs().max()),
                                   msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(got.norms, ref.norms, rtol=1e-5, atol=1e-6)
    projector = FactoredProjector(64, seed=1)
    a = lean.per_sample_grads(batch, projector=projector)
    b = full.per_sample_grads(batch, projector=FactoredProjector(64, seed=1))
    torch.testing.assert_close(a.projected, b.projected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.norms, b.norms, rtol=1e-5, atol=1e-6)


class LargestOutput(TorchDispatchMode):
    """The largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_no_tensor_the_size_of_the_logits_on_the_lean_path(tied, monkeypatch):
    """Norms, dots and factored projections of the head on the lean path form no tensor of B x T x V
    entries (the logits path forms several); vocabulary chunks of 16 out of 512."""
    monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", "64x16")
    model = tiny_gpt(vocab_size=512, d_model=16, n_heads=2)
    if tied:
        model.head.weight = model.tok_emb.weight
    batch = build_batch(vocab=512)
    B, T = batch["input_ids"].shape
    logits_size = B * T * 512
    spec = ["head", "tok_emb"]
    target = TorchInterface(model).batch_grad(batch, spec)
    sizes = {}
    for lean in (True, False):
        interface = TorchInterface(model, lean=lean)
        with LargestOutput() as mode:
            interface.per_sample_grad_norms(batch, spec)
            interface.per_sample_grad_dots(batch, target, spec)
            interface.per_sample_grads(batch, spec, projector=FactoredProjector(32))
        sizes[lean] = mode.largest
    assert sizes[False] >= logits_size
    assert sizes[True] < logits_size // 4, sizes


def test_peft_lora_llama_lean_equals_logits(monkeypatch):
    """LoRA adapters scored on the lean path (the frozen head untouched, the loss's gradient still reaching
    the adapters through the hidden states) equal the logits path."""
    import peft
    monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", "4x7")
    model = peft.get_peft_model(tiny_llama(False), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     lora_dropout=0.0, init_lora_weights=False,
                                                                     task_type="CAUSAL_LM"))
    batch = build_batch(vocab=96)
    lean, full = TorchInterface(model), TorchInterface(model, lean=False)
    for params in ("lora", ["lora", "lm_head"]):
        ref = full.per_sample_grad_norms(batch, params)
        assert (ref > 0).all()
        torch.testing.assert_close(lean.per_sample_grad_norms(batch, params), ref, rtol=1e-5, atol=1e-6)
        target = full.batch_grad(build_batch(vocab=96, seed=2), params)
        torch.testing.assert_close(lean.per_sample_grad_dots(batch, target, params),
                                   full.per_sample_grad_dots(batch, target, params), rtol=1e-5, atol=1e-6)
    run = capture(model, batch, ["lora", "lm_head"], forward=lean.forward, lean=True)
    assert any(isinstance(c, HeadFactor) for c in run.contributions["base_model.model.lm_head.weight"])
