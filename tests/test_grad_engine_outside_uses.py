"""The gradient engine with a hooked parameter that is also used outside its module: ghost norms,
ghost dots, FactoredProjector and SparseProjector against exact per-sample gradients from a loop of
one-sample backwards (independent of the engine and of torch.func), and the parameter reported in
`fallback`. Models without such a use keep the hook path (an empty `fallback`)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, build_batch

from dataflex.grad.api import per_sample_grads
from dataflex.grad.factored import FactoredProjector
from dataflex.grad.ghost import capture, per_sample_grad_dots, per_sample_grad_norms
from dataflex.grad.projection import SparseProjector
from dataflex.loss import per_sample_loss
from dataflex.model import TinyGPT


class FunctionalTiedGPT(TinyGPT):
    """The head is the token embedding, written F.linear(h, emb.weight) (no head module)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        del self.head

    def forward(self, input_ids, position_ids=None):
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)


class IndexedEmbeddingGPT(TinyGPT):
    """The token embedding read as emb.weight[ids] (the module is never called) and, for a second
    input, through the module too: two uses of one matrix, one of them invisible to hooks."""

    def __init__(self, both: bool = False, **kw):
        super().__init__(**kw)
        self.both = both

    def forward(self, input_ids, position_ids=None):
        x = self.tok_emb.weight[input_ids] + self.pos_emb(position_ids)
        if self.both:
            x = x + 0.5 * self.tok_emb(input_ids.flip(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class BypassedHeadGPT(TinyGPT):
    """The head called as head.forward(h): its forward hook never fires."""

    def forward(self, input_ids, position_ids=None):
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        for block in self.blocks:
            x = block(x)
        return self.head.forward(self.ln_f(x))


def loop_grads(model, batch, names) -> torch.Tensor:
    """[B, P] exact per-sample gradients of `names` (in that order), one backward per sample."""
    params = dict(model.named_parameters())
    flags = {n: params[n].requires_grad for n in names}
    rows = []
    try:
        for n in names:
            params[n].requires_grad_(True)
        model.eval()
        for i in range(batch["input_ids"].shape[0]):
            one = {k: batch[k][i:i + 1] for k in ("input_ids", "labels", "loss_mask", "position_ids")}
            logits = model(one["input_ids"], position_ids=one["position_ids"])
            loss = per_sample_loss(logits, one["labels"], one["loss_mask"])[0]
            got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).flatten().double()
                                   for n, g in zip(names, got)]))
    finally:
        for n in names:
            params[n].requires_grad_(flags[n])
    return torch.stack(rows)


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max())


CASES = {
    "functional tied head": lambda: FunctionalTiedGPT(**TINY),
    "emb.weight[ids]": lambda: IndexedEmbeddingGPT(**TINY),
    "emb.weight[ids] and emb(ids)": lambda: IndexedEmbeddingGPT(both=True, **TINY),
    "head.forward(h)": lambda: BypassedHeadGPT(**TINY),
}
OUTSIDE = {"functional tied head": "tok_emb.weight", "emb.weight[ids]": "tok_emb.weight",
           "emb.weight[ids] and emb(ids)": "tok_emb.weight", "head.forward(h)": "head.weight"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec", ["all", r"tok_emb|head|ln_f"])
def test_outside_use_goes_to_the_exact_path(case, spec):
    model, batch = CASES[case](), build_batch()
    names = list(dict((n, p) for n, p in model.named_parameters() if
                      spec == "all" or any(k in n for k in ("tok_emb", "head", "ln_f"))))
    exact = loop_grads(model, batch, names)
    with pytest.warns(UserWarning, match="outside their modules"):
        run = capture(model, batch, spec)
    assert run.fallback == [OUTSIDE[case]]
    assert rel_err(per_sample_grad_norms(model, batch, spec), exact.norm(dim=1)) < 1e-5
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(3, exact.shape[1], generator=g, dtype=torch.float64)
    assert rel_err(per_sample_grad_dots(model, batch, targets[0].float(), spec), exact @ targets[0]) < 1e-5
    assert rel_err(per_sample_grad_dots(model, batch, targets.float(), spec), exact @ targets.T) < 1e-5
    # the projectors: features of the exact gradients, and the fallback in the factored layout
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    grads = dict(zip(names, [t.view(-1, *shapes[n]) for n, t in
                             zip(names, exact.float().split([s.numel() for s in shapes.values()], 1))]))
    proj = FactoredProjector(512, seed=3)
    out = per_sample_grads(model, batch, spec, projector=proj)
    assert out.projector["fallback"] == [OUTSIDE[case]]
    assert rel_err(out.projected, proj.project_grads(grads)) < 1e-4
    sparse = SparseProjector(256, seed=2, nnz=2)
    assert rel_err(per_sample_grads(model, batch, spec, projector=sparse).projected, sparse.project(exact.float())) < 1e-4


def test_the_hooked_sum_alone_misses_the_outside_use():
    """What the fallback repairs: the hook contributions alone give a visibly different norm."""
    from dataflex.grad.ghost import _contributions, hook_plan, select_params
    model, batch = FunctionalTiedGPT(**TINY), build_batch()
    chosen = select_params(model, "tok_emb")
    plan, _ = hook_plan(model, chosen)
    records = []
    handles = [m.register_forward_hook(lambda m, a, o, r=r: records.append((m, r, a[0], o))) for m, r in plan]
    try:
        loss = per_sample_loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch["labels"],
                               batch["loss_mask"]).sum()
        grads = torch.autograd.grad(loss, [r[3] for r in records])
    finally:
        for h in handles:
            h.remove()
    hooked = sum(c.materialise().flatten(1) for rec, g in zip(records, grads)
                 for _, c in _contributions(rec[0], rec[1], rec[2], g, batch["input_ids"].shape[0]))
    exact = loop_grads(model, batch, ["tok_emb.weight"])
    assert rel_err(hooked.norm(dim=1), exact.norm(dim=1)) > 0.05
    assert rel_err(per_sample_grad_norms(model, batch, "tok_emb"), exact.norm(dim=1)) < 1e-5


def test_frozen_parameter_used_outside_is_seen():
    """A frozen chosen parameter is not in autograd's graph unless it requires grad for the forward."""
    model, batch = FunctionalTiedGPT(**TINY), build_batch()
    model.tok_emb.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="outside their modules"):
        assert capture(model, batch, "tok_emb").fallback == ["tok_emb.weight"]
    assert not model.tok_emb.weight.requires_grad                       # restored
    exact = loop_grads(model, batch, ["tok_emb.weight"])
    assert rel_err(per_sample_grad_norms(model, batch, "tok_emb"), exact.norm(dim=1)) < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_no_outside_use_keeps_the_hook_path(tie):
    """Plain models and module-level tying (head.weight = tok_emb.weight, as HF ties) stay on the hooks."""
    model, batch = TinyGPT(**TINY), build_batch()
    if tie:
        model.head.weight = model.tok_emb.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = capture(model, batch)
    assert run.fallback == []
    names = [n for n, _ in model.named_parameters()]
    exact = loop_grads(model, batch, names)
    assert rel_err(per_sample_grad_norms(model, batch), exact.norm(dim=1)) < 1e-5
