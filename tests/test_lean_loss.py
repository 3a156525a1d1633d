"""The lean loss (dataflex.core.lean_loss): per-token losses from the hidden states and the head, chunked.

Every check is against the logits path (the model's logits through `per_token_loss` /
`F.cross_entropy`), computed independently in the same test: per-token losses, the weighted
scalar of `LossWrapper` and every parameter's gradient, fp32 to 1e-5 and bf16 within bf16's
precision; tied and untied heads, TinyGPT, a random-init HF Llama and a peft LoRA one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bf16_grads_close, build_batch, tiny_gpt

from dataflex.core.lean_loss import LeanOutput, head_params, linear_cross_entropy
from dataflex.loss import LossWrapper, per_token_loss
from dataflex.models.lean import lean_forward

import transformers
transformers.logging.set_verbosity_error()


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, ref: dict, rtol=1e-5, atol=1e-6):
    assert got.keys() == ref.keys() and got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def weigh_fn(batch, seed=0, tokens=True):
    """Fixed non-uniform sample and token weights and a denominator (what the session's plugins send)."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch["labels"].shape
    answer = {"sample_weights": torch.rand(B, generator=g) + 0.25}
    if tokens:
        answer["token_weights"] = torch.rand(B, T, generator=g) * 2
    answer["denominator"] = torch.tensor(7.5)
    return lambda signal, b: answer


# ------------------------------------------------------------------------------- the function itself

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("chunk,vocab_chunk", [(1, None), (7, None), (64, None), (None, None), (7, 16), (64, 7), (1, 1)])
def test_per_token_loss_and_gradients_equal_cross_entropy(bias, frozen, chunk, vocab_chunk):
    torch.manual_seed(0)
    N, H, V = 37, 16, 50
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=bias)
    head.requires_grad_(not frozen)
    labels = torch.randint(0, V, (N,))
    labels[[3, 20]] = -100                                   # ignored: loss 0, no gradient
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(1)) * 3   # per-token weights
    ref = F.cross_entropy(head(hidden).float(), labels, reduction="none")
    (ref * upstream).sum().backward()
    ref_g = {"hidden": hidden.grad.clone(), **grads(head)}
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    got = linear_cross_entropy(hidden, head, labels, chunk_size=chunk, vocab_chunk=vocab_chunk)
    assert got.dtype == torch.float32 and got.shape == (N,)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got[3] == 0 and got[20] == 0
    (got * upstream).sum().backward()
    assert_grads_close({"hidden": hidden.grad, **grads(head)}, ref_g)
    assert (hidden.grad[[3, 20]] == 0).all()


def test_head_forms_and_shapes():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (2, 5))
    ref = per_token_loss(head(hidden), labels)
    for form in (head, (head.weight, head.bias), LeanOutput(hidden, head)):
        got = per_token_loss(form, labels) if isinstance(form, LeanOutput) else \
            per_token_loss(labels=labels, hidden=hidden, head=form)
        assert got.shape == (2, 5)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    no_bias = per_token_loss(labels=labels, hidden=hidden, head=head.weight)
    torch.testing.assert_close(no_bias, per_token_loss(hidden @ head.weight.t(), labels), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head"):
        per_token_loss(labels=labels, hidden=hidden)
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(torch.randn(2, 5, 7), head, labels)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, head, labels[:, :4])


def test_no_tensor_the_size_of_the_logits_is_kept_for_backward():
    """What autograd saves between forward and backward on the lean path: nothing of size N x V
    (the logits path saves its [N, V] log-softmax)."""
    torch.manual_seed(0)
    N, H, V = 64, 8, 512
    hidden = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    labels = torch.randint(0, V, (N,))

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn().sum().backward()
        return max(sizes)
    assert largest_saved(lambda: per_token_loss(head(hidden).unsqueeze(0), labels.unsqueeze(0))) >= N * V
    assert largest_saved(lambda: linear_cross_entropy(hidden, head, labels, chunk_size=8)) <= max(V * H, N * H)


# ------------------------------------------------------------------------------ through LossWrapper

def tied_gpt():
    model = tiny_gpt()
    model.head.weight = model.tok_emb.weight
    return model


CHUNKINGS = [None, "5x16"]     # default (one chunk here), and token blocks of 5 x vocabulary chunks of 16


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("reduction", ["token", "sample"])
@pytest.mark.parametrize("make", [tiny_gpt, tied_gpt], ids=["untied", "tied"])
def test_tinygpt_lean_equals_logits_weighted(reduction, make, chunking, monkeypatch):
    if chunking:
        monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", chunking)
    batch = build_batch()
    scalars, all_grads, last = [], [], []
    for lean in (False, True):
        model = make()
        wrapper = LossWrapper(weigh=weigh_fn(batch), reduction=reduction)
        out = model(batch["input_ids"], position_ids=batch["position_ids"], lean=lean)
        assert isinstance(out, LeanOutput) == lean
        loss = wrapper(out, batch)
        loss.backward()
        scalars.append(loss.detach())
        all_grads.append(grads(model))
        last.append(wrapper.last["loss"])
    torch.testing.assert_close(scalars[1], scalars[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[1], last[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(all_grads[1], all_grads[0])
    if make is tied_gpt:
        assert "head.weight" not in all_grads[1] and "tok_emb.weight" in all_grads[1]


def test_wrapper_keywords_equal_lean_output():
    batch = build_batch()
    model = tiny_gpt()
    out = model(batch["input_ids"], position_ids=batch["position_ids"], lean=True)
    wrapper = LossWrapper(weigh=weigh_fn(batch))
    a = wrapper(out, batch)
    b = wrapper(hidden=out.hidden, head=model.head, batch=batch)
    assert a.item() == b.item()


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_bf16_lean_equals_logits_within_bf16_precision(chunking, monkeypatch):
    if chunking:
        monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", chunking)
    batch = build_batch()
    results = []
    for lean in (False, True):
        model = tiny_gpt().to(torch.bfloat16)
        wrapper = LossWrapper(weigh=weigh_fn(batch))
        out = model(batch["input_ids"], position_ids=batch["position_ids"], lean=lean)
        tok = per_token_loss(out, batch["labels"])
        assert tok.dtype == torch.float32
        loss = wrapper(out, batch)
        loss.backward()
        results.append((tok.detach(), loss.detach(), grads(model)))
    (tok0, loss0, g0), (tok1, loss1, g1) = results
    torch.testing.assert_close(tok1, tok0, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-3)
    assert_bf16_grads_close(g0, g1)


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("reduction", ["token", "sample"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tokens_weigh_zero_with_exact_zero_gradient(reduction, bad, chunking, monkeypatch):
    """Tokens whose hidden state is NaN/inf: NaN/inf losses as on the logits path, the same weighted
    scalar, and gradients equal to the logits path's with those tokens masked out (finite, where the
    logits path's cross-entropy backward spreads NaN into the head's gradient)."""
    if chunking:
        monkeypatch.setenv("DATAFLEX_LEAN_CHUNK", chunking)
    torch.manual_seed(0)
    batch = build_batch()
    B, T = batch["labels"].shape
    model = tiny_gpt()
    with torch.no_grad():
        base = model(batch["input_ids"], position_ids=batch["position_ids"], lean=True).hidden
    broken = torch.zeros(B, T, dtype=torch.bool)
    broken[0, 3] = broken[2, 4] = broken[4, 15] = True
    assert (batch["loss_mask"][broken] == 1).all()
    hidden = base.clone().masked_fill(broken.unsqueeze(-1), bad).requires_grad_(True)

    lean_tok = per_token_loss(labels=batch["labels"], hidden=hidden, head=model.head)
    logits_tok = per_token_loss(model.head(hidden), batch["labels"])
    assert (~torch.isfinite(lean_tok) == broken).all() and (~torch.isfinite(logits_tok) == broken).all()
    torch.testing.assert_close(lean_tok[~broken], logits_tok[~broken], rtol=1e-5, atol=1e-6)

    weigh = weigh_fn(batch)
    loss = LossWrapper(weigh=weigh, reduction=reduction)(hidden=hidden, head=model.head, batch=batch)
    loss.backward()
    got = {"hidden": hidden.grad.clone(), "head": model.head.weight.grad.clone()}
    assert torch.isfinite(got["head"]).all() and (got["hidden"][broken] == 0).all()

    # reference: the logits path with those tokens out of the loss mask and a finite hidden state
    model.head.weight.grad = None
    clean = base.clone().masked_fill(broken.unsqueeze(-1), 0.0).requires_grad_(True)
    masked = dict(batch, loss_mask=batch["loss_mask"] * (~broken))
    ref_loss = LossWrapper(weigh=weigh, reduction=reduction)(model.head(clean), masked)
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["head"], model.head.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["hidden"], clean.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- HF and peft

def tiny_llama(seed=0, vocab=96, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def run_hf(model, batch, lean, reduction="token"):
    from dataflex.hf import forward_for
    forward = forward_for(model)
    out = lean_forward(forward, model, batch) if lean else forward(model, batch)
    assert isinstance(out, LeanOutput) == lean
    wrapper = LossWrapper(weigh=weigh_fn(batch), reduction=reduction)
    loss = wrapper(out, batch)
    loss.backward()
    return loss.detach(), wrapper.last["loss"], grads(model)


@pytest.mark.parametrize("reduction", ["token", "sample"])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_lean_equals_logits(reduction, tied):
    batch = build_batch(vocab=96)
    ref = run_hf(tiny_llama(tie_word_embeddings=tied), batch, False, reduction)
    got = run_hf(tiny_llama(tie_word_embeddings=tied), batch, True, reduction)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert_grads_close(got[2], ref[2])
    assert ("lm_head.weight" in ref[2]) != tied


def peft_llama(targets):
    import peft
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             lora_dropout=0.0, task_type="CAUSAL_LM",
                                                             init_lora_weights=False))


def test_peft_lora_llama_lean_equals_logits():
    """LoRA adapters with a frozen head: the lean path's forward forms the hidden-state gradient
    directly (no recomputation); the adapters' gradients equal the logits path's."""
    batch = build_batch(vocab=96)
    ref = run_hf(peft_llama(["q_proj", "v_proj"]), batch, False)
    got = run_hf(peft_llama(["q_proj", "v_proj"]), batch, True)
    assert any("lora_A" in n for n in ref[2]) and not any("lm_head" in n for n in ref[2])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(got[2], ref[2])


def test_adapter_on_the_head_falls_back_to_logits():
    from dataflex.backends.base import Backend
    from dataflex.hf import forward_for
    model = peft_llama(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="plain linear"):
        head_params(model.get_base_model().lm_head)
    batch = build_batch(vocab=96)
    assert lean_forward(forward_for(model), model, batch) is None
    backend = Backend()
    backend.model = model
    backend.interface = type("I", (), {"forward": staticmethod(forward_for(model))})()
    logits = backend.forward(batch, lean=True)
    assert logits.shape == (*batch["labels"].shape, 96)


def test_backend_forward_lean_for_tinygpt():
    from dataflex.backends.base import Backend
    batch = build_batch()
    backend = Backend()
    backend.model = tiny_gpt()
    out = backend.forward(batch, lean=True)
    assert isinstance(out, LeanOutput) and out.head is backend.model.head
    torch.testing.assert_close(per_token_loss(out, batch["labels"]),
                               per_token_loss(backend.forward(batch), batch["labels"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage,tied,hinted", [(0, False, False), (3, False, False), (3, True, False),
                                               (3, "llama", False), (0, False, True), (3, True, True)])
def test_deepspeed_engine_lean_equals_plain_logits(stage, tied, hinted, monkeypatch):
    """The engine's lean forward gives the plain module's logits-path scalar and gradients, ZeRO-0 and
    ZeRO-3 (whose head weight is a partition outside the engine's forward: the chunked loss calls it
    through its module, so the engine's hooks gather it and reduce-scatter its gradient), tied too."""
    import copy
    import os
    import sys
    from pathlib import Path
    import deepspeed  # noqa: F401
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"   # DeepSpeed's ninja
    from dataflex.backends import DeepSpeedBackend
    from deepspeed.utils import safe_get_full_grad
    batch = build_batch()
    if tied == "llama":
        from dataflex.hf import forward_for
        batch = build_batch(vocab=96)
        model = tiny_llama()
        run = forward_for(model)
    else:
        model = tied_gpt() if tied else tiny_gpt()
        run = lambda m, b: m(b["input_ids"], b["position_ids"])  # noqa: E731
    reference = copy.deepcopy(model)
    ref_loss = LossWrapper(weigh=weigh_fn(batch))(run(reference, batch), batch)
    ref_loss.backward()
    backend = DeepSpeedBackend(model, micro_batch_size=len(batch["labels"]), zero_stage=stage, lr=1e-3)
    out = backend.forward(batch, lean=True)
    assert isinstance(out, LeanOutput)
    if stage == 3:
        assert out.head.weight.numel() == 0          # partitioned: the loss must gather it
        assert isinstance(out.head, torch.nn.Linear)
    wrapper = LossWrapper(weigh=weigh_fn(batch))
    recomputed = []
    if hinted:      # the weights known before the losses: the gradients are formed in the (gathered) forward
        wrapper.known_weights = lambda b: wrapper.weigh(None, b)
        import dataflex.core.lean_loss as lean_module
        real = lean_module._recompute_backward
        monkeypatch.setattr(lean_module, "_recompute_backward", lambda *a: recomputed.append(1) or real(*a))
    loss = wrapper(out, batch)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    backend.engine.backward(loss)
    assert not recomputed
    got = {n: safe_get_full_grad(p) if stage == 3 else p.grad for n, p in backend.module.named_parameters()}
    assert_grads_close({n: g.detach() for n, g in got.items() if g is not None}, grads(reference))


def test_hf_trainer_lean_equals_logits(tmp_path, domains_builder, monkeypatch):
    """DataFlexTrainer(lean_loss=True) trains a Llama to the same per-step losses and parameters as
    lean_loss=False, and its compute_loss really took the lean path."""
    import json

    import dataflex
    import dataflex.integrations.hf_trainer as lean_module  # where compute_loss finds lean_forward
    from dataflex.integrations.hf_trainer import DataFlexTrainer
    from dataflex.reweighters import LossReweighter
    seen = []
    real = lean_module.lean_forward
    monkeypatch.setattr(lean_module, "lean_forward", lambda *a: seen.append(real(*a)) or seen[-1])
    runs = []
    for lean in (False, True):
        model = tiny_llama(vocab=64)
        flex = dataflex.DataFlex(domains_builder(16), global_batch_size=8, plugins=[LossReweighter(burnout_steps=0)],
                                 seed=0)
        out = tmp_path / str(lean)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=3, learning_rate=1e-3, logging_steps=1,
                                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                              seed=0)
        DataFlexTrainer(model=model, args=args, flex=flex, lean_loss=lean).train()
        losses = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((torch.tensor(losses), {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert len(seen) == 3 and all(isinstance(x, LeanOutput) for x in seen)
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-6)
    assert_grads_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-5)


def test_trainer_lean_loss_is_a_checked_boolean_defaulting_to_true():
    from pathlib import Path

    from omegaconf import OmegaConf

    from dataflex.run.config import check_value
    from dataflex.utils.errors import ConfigError
    default = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/trainer/default.yaml")
    assert default.lean_loss is True
    check_value("trainer.lean_loss", False)
    with pytest.raises(ConfigError, match="trainer.lean_loss='yes': expected true or false"):
        check_value("trainer.lean_loss", "yes")


@pytest.mark.parametrize("output", ["loss", "token_loss"])
def test_probes_take_the_lean_path_and_equal_the_logits_path(output):
    """Probes (every selector's and reweighter's losses of other samples) use the lean path where the model
    offers its head; the values equal the logits path's."""
    import dataflex.grad.interface as interface_module
    from dataflex.grad.interface import TorchInterface
    from dataflex.models.tiny_gpt import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(vocab_size=97, seq_len=16, d_model=32, n_layers=2, n_heads=4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 17), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": (torch.rand(4, 16, generator=g) > 0.2).float(),
             "position_ids": torch.arange(16).expand(4, 16)}
    calls = []
    real = interface_module.lean_forward
    interface_module.lean_forward = lambda *a: calls.append(1) or real(*a)
    try:
        lean = TorchInterface(model).probe(batch, output)
    finally:
        interface_module.lean_forward = real
    full = TorchInterface(model, lean=False).probe(batch, output)
    assert calls, "the probe did not take the lean path"
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-6)
