"""Per-sample gradients (dataflex.grad.params, TorchInterface) against a single-sample loop and opacus;
the seeded Rademacher projector (dataflex.grad.projection)."""
import copy

import pytest
import torch
from conftest import build_batch, tiny_gpt

from dataflex.core.loss import per_sample_loss
from dataflex.grad.api import per_sample_grads
from dataflex.grad.interface import TorchInterface
from dataflex.grad.params import select_params
from dataflex.grad.projection import RademacherProjector

SPECS = ["all", r"blocks\.0\.", "lora"]


def make_model(spec):
    if spec != "lora":
        return tiny_gpt()
    model = tiny_gpt(lora_rank=4)
    # lora_B starts at zero, which makes every lora_A gradient zero: give the adapters real values
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def loop_grads(model, batch, names):
    """Reference: one backward per sample, the sample without its padding, loss = mean over label tokens."""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i, n in enumerate(batch["lengths"].tolist()):
        logits = model(batch["input_ids"][i:i + 1, :n], position_ids=torch.arange(n).unsqueeze(0))
        loss = per_sample_loss(logits, batch["labels"][i:i + 1, :n], batch["loss_mask"][i:i + 1, :n])[0]
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        for k, g in zip(names, grads):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


def opacus_grads(model, batch, names):
    """Reference: opacus hooks; per-sample mean losses summed, so grad_sample is each sample's gradient."""
    from opacus import GradSampleModule

    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    gsm = GradSampleModule(model, loss_reduction="sum")
    logits = gsm(batch["input_ids"], position_ids=batch["position_ids"])
    per_sample_loss(logits, batch["labels"], batch["loss_mask"]).sum().backward()
    params = dict(model.named_parameters())
    out = {k: params[k].grad_sample.detach().clone() for k in names}
    gsm._close()
    return out


def assert_grads_close(got, ref):
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=2e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("spec", SPECS)
def test_per_sample_grads_match_loop_and_opacus(spec):
    model = make_model(spec)
    batch = build_batch()
    got = per_sample_grads(model, batch, params=spec, chunk_size=16)
    names = list(select_params(model, spec))
    if spec == "lora":
        assert names and all("lora_" in n for n in names)
        assert len(names) == 2 * 4 * 2  # A and B of q, k, v, o in 2 blocks
    elif spec != "all":
        assert names and all(n.startswith("blocks.0.") for n in names)
    else:
        assert names == [n for n, _ in model.named_parameters()]
    assert list(got.grads) == names
    assert_grads_close(got.grads, loop_grads(model, batch, names))
    assert_grads_close(got.grads, opacus_grads(model, batch, names))
    # the gradients are not trivially zero anywhere
    for k, g in got.grads.items():
        assert g.flatten(1).norm(dim=1).min() > 0, k
    # model parameters untouched and no .grad left behind
    assert all(p.grad is None for p in model.parameters())


def test_chunking_norms_and_interface_agree():
    model = tiny_gpt()
    batch = build_batch()
    full = per_sample_grads(model, batch, params=r"blocks\.1\.|head", chunk_size=16)
    chunked = per_sample_grads(model, batch, params=r"blocks\.1\.|head", chunk_size=4)
    single = TorchInterface(model).per_sample_grads(batch, params=r"blocks\.1\.|head", chunk_size=1)
    for other in (chunked, single):
        assert_grads_close(other.grads, full.grads)
        torch.testing.assert_close(other.norms, full.norms, rtol=1e-5, atol=0)
    # norms are the L2 norms of the materialised gradients over the chosen parameters
    flat = full.flat()
    assert flat.shape == (6, sum(p.numel() for p in select_params(model, r"blocks\.1\.|head").values()))
    torch.testing.assert_close(full.norms, flat.double().norm(dim=1).float(), rtol=1e-5, atol=0)
    assert full.projected is None


def test_select_params_patterns_and_errors():
    model = tiny_gpt(lora_rank=2)
    assert set(select_params(model, ["lora", r"^head\."])) == {
        n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("head.")}
    with pytest.raises(ValueError, match="no parameter matches"):
        select_params(model, r"nonexistent_layer")
    with pytest.raises(ValueError, match="no parameter matches"):
        select_params(tiny_gpt(), "lora")  # a model without adapters


# -- projection -------------------------------------------------------------------------------

def test_projection_equals_flat_grads_times_matrix():
    model = tiny_gpt()
    batch = build_batch()
    spec = r"blocks\.1\.attn\."
    plain = per_sample_grads(model, batch, params=spec)
    flat = plain.flat()
    proj = RademacherProjector(64, seed=3, block_size=1000)
    out = per_sample_grads(model, batch, params=spec, projector=proj, chunk_size=4)
    R = proj.matrix(flat.shape[1])
    assert R.shape == (flat.shape[1], 64)
    assert set(R.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(out.projected, flat @ R, rtol=1e-4, atol=1e-5)
    assert out.grads is None
    torch.testing.assert_close(out.norms, plain.norms, rtol=1e-5, atol=0)
    assert out.projector == {"projector": "dataflex.rademacher.v1", "dim": 64, "seed": 3, "block_size": 1000,
                             "scale": False}
    scaled = RademacherProjector(64, seed=3, block_size=1000, scale=True).project(flat)
    torch.testing.assert_close(scaled, (flat @ R) / 8.0, rtol=1e-4, atol=1e-5)


def test_projector_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 2500, generator=g)
    a = RademacherProjector(32, seed=7, block_size=512)
    b = RademacherProjector(32, seed=7, block_size=512)
    c = RademacherProjector(32, seed=8, block_size=512)
    assert torch.equal(a.matrix(2500), b.matrix(2500))
    assert torch.equal(a.project(x), b.project(x))
    assert not torch.equal(a.matrix(2500), c.matrix(2500))
    assert (a.project(x) - c.project(x)).abs().max() > 1.0
    # blocks are distinct (not one block repeated)
    M = a.matrix(2500)
    assert not torch.equal(M[:512], M[512:1024])
    # the projection of a sample does not depend on which other samples share its chunk
    rows = torch.cat([a.project(x[i:i + 3]) for i in range(0, 10, 3)])
    torch.testing.assert_close(rows, a.project(x), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        RademacherProjector(0)


def test_projected_grads_same_across_sample_chunkings():
    model = tiny_gpt()
    batch = build_batch()
    proj = RademacherProjector(128, seed=11, block_size=2048)
    outs = [per_sample_grads(model, batch, params=r"blocks\.0\.", projector=proj, chunk_size=c).projected
            for c in (1, 4, 16)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-4)


def test_johnson_lindenstrauss_inner_products():
    """Pairwise inner products of projected per-sample gradients track the exact ones (R^T R ~ d I)."""
    model = tiny_gpt()
    batch = build_batch(lengths=(16,) * 20 + (9, 12, 5, 14), prompts=(0,) * 20 + (2, 3, 0, 6), seed=4)
    flat = per_sample_grads(model, batch, params=r"blocks\.1\.").flat().double()
    exact = flat @ flat.T
    iu = torch.triu_indices(len(flat), len(flat), offset=1)
    exact_pairs = exact[iu[0], iu[1]]
    corr = {}
    for d in (256, 1024, 4096):
        y = RademacherProjector(d, seed=0, block_size=4096).project(flat.float()).double()
        approx = (y @ y.T)[iu[0], iu[1]] / d
        corr[d] = torch.corrcoef(torch.stack([exact_pairs, approx]))[0, 1].item()
        # norms are preserved in expectation: ||R^T g||^2 / d ~ ||g||^2
        ratio = (y.pow(2).sum(1) / d) / flat.pow(2).sum(1)
        assert (ratio - 1).abs().max() < 6 * (2 / d) ** 0.5 + 0.05
    assert corr[4096] > 0.9, corr
    assert corr[256] < corr[1024] < corr[4096], corr


def test_projector_signs_are_fair_and_cache_is_transparent():
    cached, uncached = RademacherProjector(dim=200, seed=5, block_size=300), RademacherProjector(dim=200, seed=5, block_size=300, cache_mb=0)
    R = cached.matrix(1000)
    assert set(R.unique().tolist()) == {-1.0, 1.0}
    assert abs(R.mean().item()) < 0.01                       # 200k fair signs: sd of the mean ~0.002
    gram = (R.T @ R) / R.shape[0]
    assert (gram - torch.eye(200)).abs().max() < 0.2         # columns nearly orthogonal
    x = torch.randn(7, 1000)
    torch.testing.assert_close(cached.project(x), uncached.project(x))
    torch.testing.assert_close(cached.project(x), x @ R, rtol=1e-4, atol=1e-4)  # blocked sums
    assert uncached._cache == {} and cached._cache
