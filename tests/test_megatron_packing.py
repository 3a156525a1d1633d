"""Packed rows on backend=megatron: Megatron-core's GPTModel (CPU device shim) attends within each sample of a
packed row through an explicit block-diagonal causal mask, so every per-sample loss, the training step's loss
and its gradients are those of the same samples run padded, one per row (an independent computation: the
model's own causal mask on padded rows)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import megatron.core  # noqa: E402,F401  (required: a broken install fails here, never skips)
from test_packing import SEQ, VOCAB, ragged_domains  # noqa: E402

from dataflex.core.loss import LossWrapper  # noqa: E402
from dataflex.core.packing import plan_rows, slice_rows  # noqa: E402
from dataflex.core.sampler import DataAwareSampler  # noqa: E402
from dataflex.data.mixture import MixtureDataset  # noqa: E402
from dataflex.models.tiny_gpt import TinyGPT  # noqa: E402
from dataflex.utils import dist  # noqa: E402

SIZES = dict(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_layers=2, n_heads=4)


@pytest.fixture
def megatron_backend():
    from dataflex.backends import build_backend

    def make(global_batch_size=4, **options):
        return build_backend("megatron", TinyGPT(**SIZES), global_batch_size, 1, options={"name": "megatron", **options},
                             seed=0, lr=1e-3, warmup_steps=0, max_steps=10)
    yield make
    dist.use_group(None)


def packed_step(seed=0, rows=4):
    data = MixtureDataset(ragged_domains(seed))
    plan = plan_rows([], DataAwareSampler(data.sizes, seed=seed).draw, data.lengths, rows, SEQ)
    assert plan.rows.bincount().max() >= 2 and len(plan.ids) > rows       # rows really hold several samples
    return data, plan, data.packed_batch(plan.ids, plan.rows, plan.offsets, rows)


def test_packed_per_sample_losses_equal_padded(megatron_backend):
    backend = megatron_backend()
    data, plan, batch = packed_step()
    padded = data.batch(plan.ids)
    want = backend.interface.probe(padded, "loss")           # one sample a row, Megatron's own causal mask
    got = backend.interface.probe(batch, "loss")
    assert got.shape == (len(plan.ids),)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tokens = backend.interface.probe(batch, "token_loss")    # per sample [S, T], as the padded probe gives them
    torch.testing.assert_close(tokens, backend.interface.probe(padded, "token_loss"), rtol=1e-5, atol=1e-5)
    seen = {}
    backend.forward_backward(batch, LossWrapper(weigh=lambda signal, b: seen.update(signal) or None))
    torch.testing.assert_close(seen["loss"], want, rtol=1e-5, atol=1e-5)      # the training step's loss_func


def test_changing_one_sample_changes_no_other_loss_in_its_row(megatron_backend):
    backend = megatron_backend()
    _, plan, batch = packed_step(seed=3)
    crowded = torch.nonzero(plan.rows == plan.rows.bincount().argmax()).flatten()
    victim = int(crowded[0])          # the first sample of a crowded row: the others come after it (causal)
    changed = {k: v.clone() for k, v in batch.items()}
    slots = batch["segment_ids"] == victim
    changed["input_ids"][slots] = (changed["input_ids"][slots] * 7 + 3) % VOCAB
    changed["labels"][slots] = (changed["labels"][slots] * 5 + 1) % VOCAB
    a, b = backend.interface.probe(batch, "loss"), backend.interface.probe(changed, "loss")
    others = torch.arange(len(plan.ids)) != victim
    torch.testing.assert_close(a[others], b[others], rtol=0, atol=1e-6)        # nothing leaks across samples
    assert (a[victim] - b[victim]).abs() > 1e-3


@pytest.mark.parametrize("micro", [None, 2])
def test_packed_training_step_equals_padded(megatron_backend, micro):
    """The weighted step on packed rows (one micro-batch, or two of two rows each) gives the loss and the
    gradients of the same samples padded one a row, with the same per-sample weights."""
    data, plan, batch = packed_step()
    padded = data.batch(plan.ids)
    weights = torch.linspace(0.25, 2.0, len(plan.ids))
    results = []
    for b, size in ((batch, micro), (padded, None)):
        backend = megatron_backend(global_batch_size=len(b["input_ids"]), micro_batch_size=size)
        loss = backend.forward_backward(b, LossWrapper(weigh=lambda signal, _: {"sample_weights": weights}))
        results.append((loss, {n: p.main_grad.clone() for n, p in backend.module.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_of_packed_rows_hold_their_own_samples():
    _, plan, batch = packed_step()
    parts = [slice_rows(batch, i, i + 1) for i in range(4)]
    assert torch.equal(torch.cat([p["sample_id"] for p in parts]), batch["sample_id"])
    for r, p in enumerate(parts):
        assert torch.equal(p["sample_id"], plan.ids[plan.rows == r])
        seg = p["segment_ids"][p["segment_ids"] >= 0]
        assert seg.min() == 0 and seg.max() == len(p["sample_id"]) - 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_transformer_engine_without_cuda_is_refused_with_the_way_out(megatron_backend):
    with pytest.raises(ValueError, match="transformer_engine=true needs CUDA.*leave it false"):
        megatron_backend(transformer_engine=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="THD packed sequences need CUDA")
def test_thd_packed_sequences_equal_padded_on_cuda(megatron_backend):
    pytest.importorskip("transformer_engine")
    backend = megatron_backend(transformer_engine=True)
    data, plan, batch = packed_step()
    want = backend.interface.probe(data.batch(plan.ids), "loss")
    torch.testing.assert_close(backend.interface.probe(batch, "loss"), want, rtol=1e-4, atol=1e-4)


def test_thd_sequences_are_the_samples_and_the_empty_runs():
    """cu_seqlens of the flattened rows: one sequence per sample (from the plan's rows, offsets and lengths)
    and one per run of empty slots at a row's end."""
    from dataflex.backends.megatron.model import thd_params
    _, plan, batch = packed_step()
    params = thd_params(batch)
    want = set()
    for r in range(4):
        mine = plan.rows == r
        starts = (r * SEQ + plan.offsets[mine]).tolist()
        end = int((plan.offsets[mine] + plan.lengths[mine]).max())
        want |= set(starts) | ({r * SEQ + end} if end < SEQ else set())
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == sorted(want) + [4 * SEQ]
    assert params.max_seqlen_q == int((params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).max())


def test_megatron_lm_adapter_trains_packed_rows_per_sample(megatron_backend):
    """pretrain_gpt.py's way in on packed rows (Megatron-LM's reset-attention-mask convention) through Megatron's
    schedule: the step's per-sample losses are those of the same samples padded, and two micro-batches of two
    rows give the gradients of one micro-batch of four."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dataflex.backends.megatron.cpu_shim import cpu_device
    from dataflex.backends.megatron.megatron_lm import MegatronLMData, megatron_lm_forward_step
    from dataflex.session.flex import DataFlex

    data = MixtureDataset(ragged_domains())
    grads = []
    for micro in (2, 4):
        backend = megatron_backend()
        flex = DataFlex(data, global_batch_size=4, seed=0, packing=True)
        records = []
        it = MegatronLMData(flex, micro_batch_size=micro, on_step=records.append)
        with cpu_device():
            backend.model.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=megatron_lm_forward_step(flex), data_iterator=it,
                                        model=[backend.model], num_microbatches=4 // micro, seq_length=SEQ,
                                        micro_batch_size=micro)
        it.finish()
        grads.append({n: p.main_grad.clone() for n, p in backend.module.named_parameters()})
        ids = torch.tensor(records[0]["ledger"]["sample_id"])
        assert len(ids) > 4 and len(flex.state.batch_ids) == len(ids)
        want = backend.interface.probe(data.batch(ids), "loss")
        torch.testing.assert_close(torch.tensor(records[0]["ledger"]["loss"]).float(), want, rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
