"""Gradient signals on packed batches (several samples a row): exact per-sample gradients, ghost norms and
ghost dots, the sparse and factored projectors, per segment.

The reference is independent of the packed path: the same samples run padded, one per row
(`MixtureDataset.batch`), through the same engines; and inside the packed path the masked T x T ghost form
against the gradients it materialises."""
import pytest
import torch
from test_packing import SEQ, llama, packed_step, tiny

from dataflex.core.packing import Segments
from dataflex.grad.factored import FactoredProjector
from dataflex.grad.fallback import loop_per_sample_grads
from dataflex.grad.factors import ghost_inner
from dataflex.grad.ghost import capture
from dataflex.grad.interface import TorchInterface
from dataflex.grad.params import select_params
from dataflex.grad.projection import SparseProjector


def close(got, want, rtol=2e-5, scale=None):
    """|got - want| <= rtol * max|want| (or * scale): float sums in another order (several samples a row)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp(min=1e-30) if scale is None else scale
    assert got.shape == want.shape
    assert ((got - want).abs() / scale).max() < rtol, ((got - want).abs() / scale).max()


def flat_target(model, k, seed=0):
    P = sum(p.numel() for p in select_params(model, "all").values())
    return torch.randn(k, P, generator=torch.Generator().manual_seed(seed))


def check_packed_equals_padded(model, batch, padded, exact_grads=True):
    iface = TorchInterface(model)
    S = len(batch["sample_id"])
    assert batch["input_ids"].shape[0] < S                        # rows really hold several samples
    want = iface.per_sample_grads(padded)                          # exact (torch.func), one sample a row
    if exact_grads:
        got = iface.per_sample_grads(batch)
        assert list(got.grads) == list(want.grads)
        close(got.flat(), want.flat())
        scale = want.flat().abs().max()       # some are zero up to rounding (a key bias under softmax)
        for name in want.grads:
            close(got.grads[name], want.grads[name], scale=scale)
    close(iface.per_sample_grad_norms(batch), want.norms)
    close(iface.per_sample_grad_norms(batch), iface.per_sample_grad_norms(padded))
    for k in (1, 3):                  # one target: per-token terms summed per segment; three: materialised
        target = flat_target(model, k, seed=k)
        got = iface.per_sample_grad_dots(batch, target[0] if k == 1 else target)
        ref = want.flat().double() @ target.double().T
        close(got, ref[:, 0] if k == 1 else ref)
    return iface, want


def test_tinygpt_packed_grads_norms_dots_and_projections_equal_padded():
    data, plan, batch = packed_step(seed=0)
    padded = data.batch(plan.ids)
    model = tiny(4)
    iface, want = check_packed_equals_padded(model, batch, padded)
    # projectors over the hook engine on the packed rows: the padded rows' features
    sparse = SparseProjector(64, seed=2)
    close(iface.per_sample_grads(batch, projector=sparse).projected,
          iface.per_sample_grads(padded, projector=sparse).projected)
    close(iface.per_sample_grads(batch, projector=sparse).projected, sparse.project(want.flat()))
    factored = FactoredProjector(96, seed=3)
    got = iface.per_sample_grads(batch, projector=factored)
    close(got.projected, iface.per_sample_grads(padded, projector=factored).projected)
    close(got.projected, factored.project_grads({n: g for n, g in want.grads.items()}))
    close(got.norms, want.norms)
    # any chunking of the packed rows (samples renumbered per chunk, then put back in order)
    for chunk in (1, 3):
        close(iface.per_sample_grad_norms(batch, chunk_size=chunk), want.norms)
        close(iface.per_sample_grads(batch, projector=sparse, chunk_size=chunk).projected,
              sparse.project(want.flat()))
    # the exact loop (where torch.func cannot go) takes packed batches too
    loop = loop_per_sample_grads(model, batch, r"blocks\.0\.attn")
    for name, g in loop.grads.items():
        close(g, want.grads[name], scale=want.flat().abs().max())


def test_packed_ghost_form_is_masked_to_each_segment():
    """The T x T ghost form of a packed row, restricted to same-segment pairs, equals the squared norm of the
    per-sample factor it materialises, and the padded row's; without the mask (the row as one sample) it
    does not."""
    data, plan, batch = packed_step(seed=3)
    padded = data.batch(plan.ids)
    model = tiny(5)
    run, ref = capture(model, batch, "all"), capture(model, padded, "all")
    assert run.batch_size == len(plan.ids) and not run.fallback
    apart = []
    dense_scale = max(float(c.abs().max()) for parts in ref.contributions.values() for c in parts
                      if not hasattr(c, "rows"))       # a key bias's gradient is zero up to rounding
    for name, parts in run.contributions.items():
        for f, r in zip(parts, ref.contributions[name]):
            if not hasattr(f, "rows"):
                close(f, r, scale=dense_scale)       # dense: biases, LayerNorm weights, summed per segment
                continue
            sq = ghost_inner(f, f)
            close(sq, f.materialise().flatten(1).pow(2).sum(1), rtol=1e-4)
            close(sq, ghost_inner(r, r), rtol=1e-4)
            whole = (f.rows @ f.rows.transpose(1, 2) if not f.onehot else
                     (f.rows.unsqueeze(2) == f.rows.unsqueeze(1)).float()) * (f.cols @ f.cols.transpose(1, 2))
            row_norms = whole.sum((1, 2))                # each row's gradient as if it were one sample
            per_row = torch.zeros(len(row_norms)).index_add(0, plan.rows, sq)
            apart.append(float(((row_norms - per_row).abs() / per_row.abs().max()).max()))
    assert len(apart) >= 8
    assert max(apart) > 0.05          # the cross-sample pairs the mask drops are not negligible


def test_packed_batch_grad_is_the_padded_one():
    data, plan, batch = packed_step(seed=6)
    iface = TorchInterface(tiny(6))
    got, want = iface.batch_grad(batch), iface.batch_grad(data.batch(plan.ids))
    scale = max(float(g.abs().max()) for g in want.values())   # a key bias's gradient is zero up to rounding
    assert list(got) == list(want)
    for name in want:
        close(got[name], want[name], scale=scale)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_llama_packed_grads_norms_dots_equal_padded(impl):
    model = llama(impl)
    data, plan, batch = packed_step(seed=1)
    assert batch["input_ids"].shape[1] == SEQ
    check_packed_equals_padded(model, batch, data.batch(plan.ids))


def test_probes_of_logits_refuse_packed_batches():
    """Per-sample probes take packed rows (tests/test_packing_probes.py); logits and raw outputs are per row."""
    _, _, batch = packed_step()
    for output in ("logits", "outputs"):
        with pytest.raises(ValueError, match="packed"):
            TorchInterface(tiny()).probe(batch, output)


def test_a_sample_without_token_slots_has_a_zero_gradient():
    """A packed batch may list a sample that takes no slot (no label token): zero norm, zero dots, zeros from
    every chunking."""
    _, plan, batch = packed_step(seed=2)
    S = len(plan.ids)
    extra = dict(batch, sample_id=torch.cat([batch["sample_id"], batch["sample_id"][:1]]))
    assert Segments.of(extra).n == S + 1
    iface = TorchInterface(tiny(8))
    norms = iface.per_sample_grad_norms(batch)
    for chunk in (None, 2):
        got = iface.per_sample_grad_norms(extra, chunk_size=chunk)
        assert got[S] == 0
        close(got[:S], norms)
    assert float(iface.per_sample_grads(extra).norms[S]) == 0
