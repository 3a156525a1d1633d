"""The interface on a real DeepSpeed engine gives the same signals as on the plain module."""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

from dataflex.backends import DeepSpeedBackend
from dataflex.grad.interface import TorchInterface
from dataflex.grad.projection import RademacherProjector
from dataflex.models.tiny_gpt import TinyGPT

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # DeepSpeed's ninja


def batch(B=6, T=12, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    mask = torch.ones(B, T)
    mask[1, 8:] = 0          # padding
    mask[2, :4] = 0          # a prompt that is not trained on
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(T).expand(B, T).contiguous()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_signals_match_plain_module(stage):
    model = TinyGPT(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4, lora_rank=2)
    reference = TorchInterface(copy.deepcopy(model))
    backend = DeepSpeedBackend(model, micro_batch_size=6, zero_stage=stage, lr=1e-3)
    b = batch()
    torch.testing.assert_close(backend.interface.probe(b), reference.probe(b), rtol=1e-6, atol=1e-6)
    if stage == 3:
        with pytest.raises(NotImplementedError, match="ZeRO stage 3"):
            backend.interface.per_sample_grads(b)
        return
    for params in ("all", "lora"):
        got = backend.interface.per_sample_grads(b, params=params)
        want = reference.per_sample_grads(b, params=params)
        assert got.grads.keys() == want.grads.keys()
        torch.testing.assert_close(got.flat(), want.flat(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-5, atol=1e-7)
    proj = RademacherProjector(dim=128, seed=3)
    torch.testing.assert_close(backend.interface.per_sample_grads(b, projector=proj).projected,
                               reference.per_sample_grads(b, projector=proj).projected, rtol=1e-4, atol=1e-5)


def test_zero3_gradient_signals_leave_training_gradients_alone():
    """Ghost norms between ZeRO-3 steps (a selector's signal) are not a training backward: each step's gradient
    equals that of the same engine run without them (DeepSpeed's output hooks once added it onto the last step's)."""
    from deepspeed.utils import safe_get_full_grad

    from dataflex.core.loss import per_token_loss, reduce_loss

    grads = {}
    for signals in (False, True):
        model = TinyGPT(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4)
        backend = DeepSpeedBackend(model, micro_batch_size=6, zero_stage=3, lr=1e-3)
        b, norms = batch(), []
        for step in range(3):
            if signals:
                norms.append(backend.interface.per_sample_grad_norms(b))
            backend.engine.backward(reduce_loss(per_token_loss(backend.forward(b), b["labels"]), b["loss_mask"]))
            module = backend.engine.module
            grads[signals, step] = torch.cat([safe_get_full_grad(p).flatten() for p in module.parameters()])
            backend.engine.step()
    for step in range(3):
        torch.testing.assert_close(grads[True, step], grads[False, step], rtol=1e-5, atol=1e-7)
