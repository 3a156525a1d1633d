"""The README's Megatron-core drop-in loop with several micro-batches (Megatron-LM's usual setting): the
loss_func runs once per micro-batch, and flex.loss gathers every micro-batch's per-sample signals of the
step before end_step. Real megatron-core (schedule, DDP, optimizer) on the CPU shim."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import megatron.core  # noqa: E402,F401  (required: a broken install fails here, never skips)

from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.utils import dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(seq_len=16, d_model=32, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def domains():
    from omegaconf import OmegaConf

    from dataflex.data.domains import load_domains
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return load_domains(OmegaConf.load(ROOT / "configs" / "data" / "default.yaml"), seq_len=16)
    finally:
        os.chdir(cwd)


def split(batch: dict, parts: int) -> list:
    n = len(batch["input_ids"]) // parts
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def drop_in(domains, plugins, micro_batches: int, steps: int = 3):
    """The README's drop-in loop, with the local batch cut into `micro_batches` micro-batches."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import dataflex
    from dataflex.backends import build_backend
    from dataflex.backends.megatron.cpu_shim import cpu_device

    backend = build_backend("megatron", TinyGPT(**SIZES, vocab_size=domains.tokenizer.vocab_size), 8, 1, options={},
                            seed=0, lr=1e-2, warmup_steps=0, max_steps=0)
    model, optimizer = backend.model, backend.optimizer
    flex = dataflex.DataFlex(domains.train, global_batch_size=8, plugins=plugins, seed=0,
                             rank=ps.get_data_parallel_rank(), world_size=ps.get_data_parallel_world_size())
    dataflex.dist.use_group(ps.get_data_parallel_group())

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        token_loss = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])
        return token_loss, lambda token_loss: (flex.loss.from_token_loss(token_loss, batch), {})

    records, grads = [], {}
    with cpu_device():
        for step in range(steps):
            batch = flex.next_batch()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(split(batch, micro_batches)),
                                        model=[model], num_microbatches=micro_batches, seq_length=16,
                                        micro_batch_size=8 // micro_batches)
            if step == 0:      # the first step's gradient, before the optimizer (Adam hides a gradient's scale)
                grads = {n: p.main_grad.detach().clone() for n, p in backend.module.named_parameters()}
            optimizer.step()
            records.append(flex.end_step())
    params = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    dist.use_group(None)
    return records, params, grads


def _mixers(kind):
    from dataflex.mixers import BanditMixer, StaticMixer
    return {"bandit": lambda: [BanditMixer()],
            "static-loss": lambda: [StaticMixer(weights={"prose": 0.5, "code": 0.2, "math": 0.2, "noise": 0.1},
                                                apply="loss")]}[kind]()


@pytest.mark.parametrize("kind", ["bandit", "static-loss"])
def test_one_two_and_four_micro_batches_give_the_same_ledger_and_model(domains, kind):
    """The ledger (samples, weights, losses), the mixer's weights and the trained parameters after three steps
    are the same with 1, 2 and 4 micro-batches (to float tolerance), and so is the first step's gradient:
    every micro-batch's signals reach end_step and each micro-batch's scalar is its share of the step's loss
    under Megatron's averaging over micro-batches."""
    runs = {m: drop_in(domains, _mixers(kind), m) for m in (1, 2, 4)}
    ref_records, ref_params, ref_grads = runs[1]
    for m in (2, 4):
        records, params, grads = runs[m]
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7)
        for got, want in zip(records, ref_records):
            assert got["ledger"]["sample_id"] == want["ledger"]["sample_id"]
            assert len(got["ledger"]["sample_id"]) == 8
            torch.testing.assert_close(torch.tensor(got["ledger"]["loss"]), torch.tensor(want["ledger"]["loss"]),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(torch.tensor(got["ledger"]["weight"]), torch.tensor(want["ledger"]["weight"]))
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
            for d, w in want["domain_weights"].items():
                assert got["domain_weights"][d] == pytest.approx(w, rel=1e-4, abs=1e-6)
        for name, p in ref_params.items():
            assert (params[name] - p).abs().max() < 1e-4, name       # Adam amplifies float noise near 0
    if kind == "static-loss":       # the domain loss weights really weigh: not all 1
        assert len(set(ref_records[0]["ledger"]["weight"])) > 1


def test_a_loss_weighing_plugin_with_micro_batches_is_refused_with_the_way_out(domains):
    from dataflex.reweighters import LossReweighter
    with pytest.raises(RuntimeError, match=r"LossReweighter weigh\(s\) samples by the step's losses.*backend=megatron"):
        drop_in(domains, [LossReweighter(burnout_steps=0)], 2, steps=1)
    dist.use_group(None)


def test_megatron_lm_pretrain_gpt_adapter(domains):
    """pretrain_gpt.py's way in, against megatron-core's own GPTModel, DDP, optimizer and schedule (CPU shim):
    the loss_func has Megatron-LM's signature and 3-tuple answer (loss, int num_tokens, {"lm loss": [masked
    token-loss sum, num_tokens]}); the data iterator yields Megatron-LM's batch keys and ends each step at
    the next iteration (flex.end_step, then on_step); two micro-batches train exactly like the README drop-in
    with one (same ledger, same first-step gradient, same model)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import dataflex
    from dataflex.backends import build_backend
    from dataflex.backends.megatron.cpu_shim import cpu_device
    from dataflex.backends.megatron.megatron_lm import (
        MEGATRON_LM_KEYS,
        MegatronLMData,
        megatron_lm_forward_step,
        megatron_lm_loss_func,
    )
    from dataflex.mixers import BanditMixer

    ref_records, ref_params, ref_grads = drop_in(domains, [BanditMixer()], 1)

    backend = build_backend("megatron", TinyGPT(**SIZES, vocab_size=domains.tokenizer.vocab_size), 8, 1, options={},
                            seed=0, lr=1e-2, warmup_steps=0, max_steps=0)
    model, optimizer = backend.model, backend.optimizer
    flex = dataflex.DataFlex(domains.train, global_batch_size=8, plugins=[BanditMixer()], seed=0,
                             rank=ps.get_data_parallel_rank(), world_size=ps.get_data_parallel_world_size())
    dataflex.utils.dist.use_group(ps.get_data_parallel_group())
    records, answers = [], []
    data = MegatronLMData(flex, micro_batch_size=4, on_step=records.append)
    inner = megatron_lm_loss_func(flex)

    def loss_func(loss_mask, output_tensor, model=None):     # Megatron-LM's signature, answers recorded
        out = inner(loss_mask, output_tensor, model=model)
        answers.append((loss_mask.clone(), output_tensor.detach().clone(), out))
        return out

    forward_step = megatron_lm_forward_step(flex, loss_func)
    with cpu_device():
        for step in range(3):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=[model],
                                        num_microbatches=2, seq_length=16, micro_batch_size=4)
            if step == 0:
                grads = {n: p.main_grad.detach().clone() for n, p in backend.module.named_parameters()}
            optimizer.step()
        data.finish()
    dist.use_group(None)
    batch = next(MegatronLMData(dataflex.DataFlex(domains.train, global_batch_size=8, seed=0), 4))
    assert tuple(batch) == MEGATRON_LM_KEYS and batch["tokens"].shape == (4, 16) and batch["attention_mask"] is None
    assert len(answers) == 6
    for loss_mask, token_loss, (loss, num_tokens, report) in answers:
        assert loss.dim() == 0 and loss.requires_grad and num_tokens.dtype == torch.int
        assert int(num_tokens) == int(loss_mask.sum())
        torch.testing.assert_close(report["lm loss"], torch.stack([(token_loss * loss_mask).sum(), loss_mask.sum()]))
    assert [r["step"] for r in records] == [0, 1, 2]
    for got, want in zip(records, ref_records):
        assert got["ledger"]["sample_id"] == want["ledger"]["sample_id"]
        torch.testing.assert_close(torch.tensor(got["ledger"]["loss"]), torch.tensor(want["ledger"]["loss"]),
                                   rtol=1e-4, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7)
    for name, p in ref_params.items():
        assert (backend.module.state_dict()[name] - p).abs().max() < 1e-4, name
