"""DataFlex with no plugin and the token reduction trains on exactly the standard token-mean loss,
on the plain torch module and on a real DeepSpeed engine (same loss, same gradients)."""
import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_domains, tiny_gpt

from dataflex.backends import DeepSpeedBackend, TorchBackend
from dataflex.session.flex import DataFlex

os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # DeepSpeed's ninja


def token_mean(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    labels = torch.where(batch["loss_mask"].bool(), batch["labels"], -100)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_no_plugin_token_reduction_equals_the_plain_token_mean_loop(backend):
    model = tiny_gpt()
    plain = copy.deepcopy(model)
    if backend == "torch":
        be = TorchBackend(model, lr=1e-3)
    else:
        be = DeepSpeedBackend(model, micro_batch_size=8, zero_stage=0, lr=1e-3)
    flex = DataFlex(synthetic_domains(n_per_domain=3), 8, interface=be.interface, seed=0)
    batch = flex.next_batch()
    assert (batch["loss_mask"].sum(-1) < batch["loss_mask"].shape[1]).any()   # a partial sample is in the batch
    loss = flex.loss(be.forward(be.to_device(batch)), batch)
    ref = token_mean(plain, batch)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    if backend == "torch":
        loss.backward()
    else:
        be.engine.backward(loss)
    ref.backward()
    for (name, p), q in zip(be.module.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)
