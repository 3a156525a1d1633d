"""The gradient engine: ghost norms and inner products (dataflex.grad.ghost), the Kronecker-factored
projector (dataflex.grad.factored), the sparse JL projector, all against materialised per-sample
gradients (torch.func) and the dense Rademacher reference."""
import copy
import math

import pytest
import torch
from conftest import build_batch, synthetic_domains, tiny_gpt
from torch import nn

import dataflex
from dataflex import (
    DataFlex,
    FactoredProjector,
    RademacherProjector,
    SparseProjector,
    TorchInterface,
    batch_grad,
    per_sample_grad_dots,
    per_sample_grad_norms,
    per_sample_grads,
    select_params,
)
from dataflex.core.loss import per_sample_loss
from dataflex.data.domains import MixtureDataset
from dataflex.grad.factored import water_fill
from dataflex.models.tiny_gpt import TinyGPT

SPECS = ["all", "lora", r"blocks\.0\.", r"ln|bias|emb"]


def model_for(spec, **kw):
    if spec != "lora":
        return tiny_gpt(**kw)
    model = tiny_gpt(lora_rank=4, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                       # lora_B = 0 would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            p.requires_grad_("lora_" in name)   # frozen base, as LoRA training has it
    return model


def rel_close(got, want, rtol=1e-5, scale=None):
    """|got - want| <= rtol * max|want| (or * scale)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp(min=1e-30) if scale is None else scale
    assert ((got - want).abs() / scale).max() < rtol, ((got - want).abs() / scale).max()


@pytest.mark.parametrize("spec", SPECS)
def test_ghost_norms_and_dots_equal_materialised(spec):
    model, batch = model_for(spec), build_batch()
    exact = per_sample_grads(model, batch, params=spec)
    flat = exact.flat().double()
    iface = TorchInterface(model)
    norms = iface.per_sample_grad_norms(batch, params=spec)
    assert norms.dtype == torch.float32 and norms.shape == (6,)
    assert ((norms.double() - flat.norm(dim=1)).abs() / flat.norm(dim=1)).max() < 1e-5
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(3, flat.shape[1], generator=g, dtype=torch.float64)
    rel_close(iface.per_sample_grad_dots(batch, targets[0].float(), params=spec), flat @ targets[0])
    rel_close(iface.per_sample_grad_dots(batch, targets.float(), params=spec), flat @ targets.T)
    # a dict target, e.g. the gradient of a validation batch
    val = build_batch(seed=3)
    target = iface.batch_grad(val, params=spec)
    assert list(target) == list(exact.grads)
    val_exact = per_sample_grads(model, val, params=spec).flat().double().mean(0)
    rel_close(torch.cat([t.flatten() for t in target.values()]), val_exact)
    rel_close(per_sample_grad_dots(model, batch, target, params=spec), flat @ val_exact)
    assert all(p.grad is None for p in model.parameters())


def test_identical_under_any_chunking():
    model, batch = model_for("lora"), build_batch()
    target = batch_grad(model, build_batch(seed=2), params="lora")
    proj = FactoredProjector(512, seed=1)
    base = (per_sample_grad_norms(model, batch, "lora"), per_sample_grad_dots(model, batch, target, "lora"),
            per_sample_grads(model, batch, "lora", projector=proj, chunk_size=None).projected)
    for size in (2,):
        other = (per_sample_grad_norms(model, batch, "lora", chunk_size=size),
                 per_sample_grad_dots(model, batch, target, "lora", chunk_size=size),
                 per_sample_grads(model, batch, "lora", projector=proj, chunk_size=size).projected)
        for a, b in zip(base, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sparse, by_vmap = SparseProjector(256, seed=2, block_size=1000), SparseProjector(256, 2, block_size=1000, engine="vmap")
    outs = [per_sample_grads(model, batch, "lora", projector=p, chunk_size=c)
            for p, c in ((sparse, 16), (sparse, 3), (by_vmap, 16))]
    exact = per_sample_grads(model, batch, "lora")
    for o in outs:
        torch.testing.assert_close(o.projected, outs[0].projected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.norms, exact.norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(outs[0].projected, exact.flat() @ sparse.matrix(exact.flat().shape[1]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["all", "lora"])
def test_factored_block_is_the_kronecker_formula(spec):
    model, batch = model_for(spec), build_batch()
    exact = per_sample_grads(model, batch, params=spec)
    proj = FactoredProjector(3000, seed=4)
    got = per_sample_grads(model, batch, params=spec, projector=proj)
    layout = got.projector["layout"]
    assert got.projector["projector"] == "dataflex.grad.factored.v1" and got.projector["seed"] == 4
    assert sum(d for _, d, _ in layout) == got.projected.shape[1] == min(3000, exact.flat().shape[1])
    torch.testing.assert_close(got.norms, exact.norms, rtol=1e-5, atol=0)
    start, scale = 0, got.projected.abs().max().double()   # k's bias has a zero gradient (softmax shift)
    for name, d, sides in layout:
        G = exact.grads[name].double()
        block = got.projected[:, start:start + d].double()
        start += d
        if sides is None:                                     # biases, LayerNorm: dense Gaussian
            P = proj.matrices(name, tuple(G.shape[1:]), d, None).double()
            want = G.flatten(1) @ P.T / math.sqrt(d)
        else:                                                 # S (P_row kron P_col) vec(G) / sqrt(d)
            P_row, P_col = (m.double() for m in proj.matrices(name, tuple(G.shape[1:]), d, sides))
            assert P_row.shape[0] * P_col.shape[0] >= d and P_row.shape[0] <= G.shape[1]
            want = (torch.kron(P_row, P_col) @ G.flatten(1).T).T[:, :d] / math.sqrt(d)
        rel_close(block, want, rtol=1e-5, scale=scale)
    # the same formula applied to the materialised gradients, in one call
    torch.testing.assert_close(proj.project_grads(exact.grads), got.projected, rtol=1e-4, atol=1e-6)


def test_water_fill_and_layout():
    assert water_fill(10, [100, 1, 100]) == [5, 1, 4]
    assert water_fill(1000, [3, 4]) == [3, 4]
    assert sum(water_fill(8192, [16384, 128, 65536, 128])) == 8192
    layout = FactoredProjector(8192).layout({"w": (2048, 128), "b": (2048,), "lora": (8, 128)})
    for name, d, sides in layout:
        if sides:
            assert sides[0] * sides[1] >= d and sides[0] <= {"w": 2048, "lora": 8}[name]


def structured_batch():
    """Three synthetic domains, so that exact gradient cosines have structure to recover."""
    return MixtureDataset(synthetic_domains(n_per_domain=8)).batch(torch.arange(24))


def test_every_projector_tracks_exact_cosines():
    """Pearson correlation of projected pairwise cosines with the exact ones rises with d."""
    model, batch = tiny_gpt(d_model=16, n_heads=2), structured_batch()
    flat = per_sample_grads(model, batch).flat()
    exact = flat.double()
    iu = torch.triu_indices(24, 24, offset=1)

    def cosines(x):
        x = x / x.norm(dim=1, keepdim=True)
        return (x @ x.T)[iu[0], iu[1]]

    ref = cosines(exact)
    floor = {"rademacher": 0.99, "sparse": 0.99, "factored": 0.95}
    for kind, make in (("rademacher", RademacherProjector), ("sparse", SparseProjector),
                       ("factored", FactoredProjector)):
        corr = {}
        for d in (1024, 4096, 8192):
            proj = make(d, seed=0)
            # the dense reference projects the exact gradients (per_sample_grads does the same)
            y = (proj.project(flat) if kind == "rademacher" else
                 per_sample_grads(model, batch, projector=proj).projected).double()
            corr[d] = torch.corrcoef(torch.stack([ref, cosines(y)]))[0, 1].item()
        assert corr[1024] < corr[4096] < corr[8192], (kind, corr)
        assert corr[8192] > floor[kind], (kind, corr)


def test_sparse_projector_is_a_seeded_sparse_sign_matrix():
    x = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0))
    a, b = SparseProjector(64, seed=3, nnz=2, block_size=700), SparseProjector(64, seed=3, nnz=2, block_size=700)
    M = a.matrix(3000)
    assert torch.equal(M, b.matrix(3000)) and not torch.equal(M, SparseProjector(64, seed=4, nnz=2).matrix(3000))
    assert ((M != 0).sum(1) <= 2).all() and ((M != 0).sum(1) >= 1).all()
    assert set((M[M != 0].abs() * 2 ** 0.5).round(decimals=4).tolist()) == {1.0}
    torch.testing.assert_close(a.project(x), x @ M, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([a.project(x[i:i + 2]) for i in range(0, 5, 2)]), a.project(x))
    assert a.describe() == {"projector": "dataflex.sparse_jl.v1", "dim": 64, "seed": 3, "nnz": 2,
                            "block_size": 700, "scale": True}
    with pytest.raises(ValueError):
        SparseProjector(0)


class DropoutGPT(TinyGPT):
    """TinyGPT with dropout after the embeddings and every block."""

    def __init__(self, p=0.2, **kw):
        super().__init__(**kw)
        self.drop = nn.Dropout(p)

    def forward(self, input_ids, position_ids=None):
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        for block in self.blocks:
            x = self.drop(block(x))
        return self.head(self.ln_f(x))


def test_dropout_in_train_mode():
    from conftest import TINY
    model, batch = DropoutGPT(**TINY).train(), build_batch()
    plain = tiny_gpt()
    plain.load_state_dict(model.state_dict())
    # default: eval mode for the call, so dropout is off and the numbers are the plain model's
    exact = per_sample_grads(model, batch)
    torch.testing.assert_close(exact.norms, per_sample_grads(plain, batch).norms)
    torch.testing.assert_close(per_sample_grad_norms(model, batch), exact.norms, rtol=1e-5, atol=0)
    assert model.training and model.drop.training
    # train_mode=True: vmap draws each sample's own mask (no error); the hook engine is exact for
    # the batched forward's masks: the same seed gives the same masks to a plain forward
    noisy = per_sample_grads(model, batch, train_mode=True).norms
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, exact.norms)
    torch.manual_seed(7)
    ghost = per_sample_grad_norms(model, batch, train_mode=True)
    torch.manual_seed(7)
    losses = per_sample_loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch["labels"],
                             batch["loss_mask"])
    params = list(model.parameters())
    ref = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                       .double().norm() for i in range(len(losses))])
    rel_close(ghost, ref)


def test_tied_weights():
    model = tiny_gpt()
    model.head.weight = model.tok_emb.weight               # an Embedding and a Linear share one matrix
    batch = build_batch()
    exact = per_sample_grads(model, batch)
    assert "head.weight" not in exact.grads
    flat = exact.flat().double()
    rel_close(per_sample_grad_norms(model, batch), flat.norm(dim=1))
    t = torch.randn(flat.shape[1], dtype=torch.float64)
    rel_close(per_sample_grad_dots(model, batch, t.float()), flat @ t)
    proj = FactoredProjector(2048, seed=0)
    torch.testing.assert_close(per_sample_grads(model, batch, projector=proj).projected,     # float32 sums of
                               proj.project_grads(exact.grads), rtol=1e-4, atol=5e-6)           # 2048-wide products


class ScaledGPT(TinyGPT):
    """A parameter outside any Linear / Embedding / LayerNorm (the vmap fallback), and an unused layer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, kw["d_model"]))
        self.unused = nn.Linear(4, 4)                         # never called: a zero gradient

    def forward(self, input_ids, position_ids=None):
        x = (self.tok_emb(input_ids) + self.pos_emb(position_ids)) * self.gain
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def test_unhookable_parameters_are_exact():
    from conftest import TINY

    from dataflex.grad.ghost import capture
    model, batch = ScaledGPT(**TINY), build_batch()
    assert capture(model, batch).fallback == ["gain"]
    exact = per_sample_grads(model, batch)
    flat = exact.flat().double()
    rel_close(per_sample_grad_norms(model, batch), flat.norm(dim=1))
    t = torch.randn(flat.shape[1], dtype=torch.float64)
    rel_close(per_sample_grad_dots(model, batch, t.float()), flat @ t)
    proj = FactoredProjector(1024)
    torch.testing.assert_close(per_sample_grads(model, batch, projector=proj).projected,
                               proj.project_grads(exact.grads), rtol=1e-4, atol=1e-6)


def test_bf16_model_accumulates_in_float32():
    model, batch = tiny_gpt(), build_batch()
    ref = per_sample_grads(model, batch).norms
    half = copy.deepcopy(model).to(torch.bfloat16)
    norms = per_sample_grad_norms(half, batch)
    assert norms.dtype == torch.float32
    assert ((norms - ref).abs() / ref).max() < 0.05
    proj = per_sample_grads(half, batch, projector=FactoredProjector(256)).projected
    assert proj.dtype == torch.float32 and torch.isfinite(proj).all()


def test_peft_lora_with_dropout():
    import peft
    base = tiny_gpt()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=r".*attn\.[qkvo]\.base")
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    batch = build_batch()
    names = list(select_params(model, "lora"))
    assert names and all("lora_" in n for n in names)
    exact = per_sample_grads(model, batch, params="lora").flat().double()
    rel_close(per_sample_grad_norms(model, batch, params="lora"), exact.norm(dim=1))
    torch.manual_seed(0)                                   # train mode (LESS's LoRA dropout 0.1) runs
    assert torch.isfinite(per_sample_grad_norms(model, batch, params="lora", train_mode=True)).all()


def test_signals_and_save(tmp_path):
    model = tiny_gpt()
    flex = DataFlex(synthetic_domains(n_per_domain=6), global_batch_size=4, interface=TorchInterface(model))
    ids = torch.tensor([0, 7, 13, 5])
    batch = flex.data.batch(ids)
    signals = flex.state.signals
    torch.testing.assert_close(signals.per_sample_grad_norms(ids, r"blocks\.1\."),
                               per_sample_grad_norms(model, batch, r"blocks\.1\."))
    target = signals.target_grad(torch.tensor([1, 2, 3]), r"blocks\.1\.")
    ref_target = batch_grad(model, flex.data.batch(torch.tensor([1, 2, 3])), r"blocks\.1\.")
    for k in ref_target:
        torch.testing.assert_close(target[k], ref_target[k])
    torch.testing.assert_close(signals.per_sample_grad_dots(ids, target, r"blocks\.1\."),
                               per_sample_grad_dots(model, batch, ref_target, r"blocks\.1\."))
    out = signals.per_sample_grads(ids, projector=FactoredProjector(128, seed=5))
    out.save(tmp_path / "f.pt", ids)
    saved = dataflex.PerSampleGrads.load(tmp_path / "f.pt")
    assert saved["projector"]["projector"] == "dataflex.grad.factored.v1" and saved["projector"]["layout"]
    torch.testing.assert_close(saved["features"], out.projected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ghost_dots_match_dattri_grad_dot():
    """External cross-check: dattri's Grad-Dot (TracIn with one checkpoint, weight 1, no
    normalisation, its projection switched off) against ghost inner products with each test
    sample's gradient as one of K targets."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model, train, test = tiny_gpt(), build_batch(), build_batch(lengths=(16, 5, 12), prompts=(3, 0, 2), seed=9)

    def loss(params, data):
        ids, labels, mask, pos = (t.unsqueeze(0) for t in data)
        logits = torch.func.functional_call(model, params, (ids,), {"position_ids": pos})
        return per_sample_loss(logits, labels, mask)[0]

    def loader(b):
        return DataLoader(TensorDataset(b["input_ids"], b["labels"], b["loss_mask"], b["position_ids"]),
                          batch_size=4, shuffle=False)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False)
    attributor.projector_kwargs = None                     # exact gradients, no random projection
    theirs = attributor.attribute(loader(train), loader(test))
    targets = per_sample_grads(model, test).flat()         # [3, P] in select_params order
    ours = per_sample_grad_dots(model, train, targets)     # [6, 3]
    rel_close(ours, theirs, rtol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_zero3_engine_runs_ghost_and_factored_paths():
    """Under ZeRO-3 the hook engine runs the module through ZeRO's submodule hooks (which gather the partitioned
    parameters): norms, dots, factored and sparse features equal the plain module's. (ZeRO 0-2 run the
    plain module itself.) One process; multi-rank ZeRO-3 is not tested here."""
    import os
    import sys
    from pathlib import Path
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    from dataflex.backends import DeepSpeedBackend
    model = tiny_gpt(lora_rank=2)
    reference = TorchInterface(copy.deepcopy(model))
    iface = DeepSpeedBackend(model, micro_batch_size=6, zero_stage=3, lr=1e-3).interface
    batch = build_batch()
    target = reference.batch_grad(build_batch(seed=1))
    torch.testing.assert_close(iface.per_sample_grad_norms(batch), reference.per_sample_grad_norms(batch))
    torch.testing.assert_close(iface.per_sample_grad_dots(batch, target), reference.per_sample_grad_dots(batch, target))
    proj = FactoredProjector(256, seed=0)
    torch.testing.assert_close(iface.per_sample_grads(batch, "lora", projector=proj).projected,
                               reference.per_sample_grads(batch, "lora", projector=proj).projected)
    sparse = SparseProjector(64)
    torch.testing.assert_close(iface.per_sample_grads(batch, projector=sparse).projected,
                               reference.per_sample_grads(batch, projector=sparse).projected)
    with pytest.raises(NotImplementedError, match="ZeRO stage 3"):
        iface.per_sample_grads(batch, projector=RademacherProjector(64))


def test_frozen_parameters_are_differentiated_too():
    """A LoRA model with its base frozen: params="all" still gets every parameter's gradient."""
    model, batch = model_for("lora"), build_batch(lengths=(16, 7, 3), prompts=(0, 2, 0))
    exact = per_sample_grads(model, batch, params=r"blocks\.0\.|head").flat().double()
    rel_close(per_sample_grad_norms(model, batch, r"blocks\.0\.|head"), exact.norm(dim=1))
