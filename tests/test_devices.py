"""Every tensor dataflex hands to a model is on that model's device, proved on a CPU-only machine.

A GPU run stops on the first CPU batch handed to a CUDA model. On CPU that bug is invisible (one
device), so these tests give the host its own colour: `MixtureDataset.batch` (where every batch of
Signals, evaluation and the training draw is built) returns `HostTensor`s, a tensor subclass that
stands for "still on the host". Moving one to a device (`.to(device)`) gives a plain tensor, as a
copy to the GPU would; a `HostTensor` meeting a plain tensor in any op (a CPU label next to CUDA
logits), or reaching the model's forward (a `CheckedGPT`, whose forward refuses it), raises. Every
Signals entry point and each plugin family runs through that; a control interface that forgets to
move its batch is caught, so the test proves what it claims.
"""
import pytest
import torch

from conftest import TINY, synthetic_domains
from dataflex.data.mixture import MixtureDataset
from dataflex.grad.factored import FactoredProjector
from dataflex.grad.interface import TorchInterface, as_reference
from dataflex.grad.projection import RademacherProjector, SparseProjector
from dataflex.models.tiny_gpt import TinyGPT
from dataflex.session import DataFlex


class HostMeetsDevice(AssertionError):
    pass


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _moves(args, kwargs) -> bool:
    """`.to(...)` / `.cuda()` with a device: the copy to the model's device."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool)
                                     for a in args[1:])


class HostTensor(torch.Tensor):
    """A tensor still on the host (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and (func is torch.Tensor.cuda or _moves(args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
                return out.as_subclass(torch.Tensor)    # on the device now: a plain tensor
        tensors = list(_tensors((args, kwargs)))
        if any(isinstance(t, HostTensor) for t in tensors) and any(
                not isinstance(t, HostTensor) and t.dim() > 0 for t in tensors):
            raise HostMeetsDevice(f"{getattr(func, '__name__', func)}: a host tensor meets a device tensor "
                                  "(a batch was not moved to the model's device)")
        return super().__torch_function__(func, types, args, kwargs)


class CheckedGPT(TinyGPT):
    """TinyGPT whose forward refuses inputs that are not on its device."""

    def forward(self, input_ids, *args, **kwargs):
        position_ids = kwargs.get("position_ids", args[0] if args else None)
        for name, t in (("input_ids", input_ids), ("position_ids", position_ids)):
            if isinstance(t, HostTensor):
                raise HostMeetsDevice(f"the model's forward got {name} on the host")
            assert t is None or t.device == next(self.parameters()).device
        return super().forward(input_ids, *args, **kwargs)


@pytest.fixture
def host_batches(monkeypatch):
    """Every batch MixtureDataset builds comes out on the host."""
    built = MixtureDataset.batch

    def batch(self, ids):
        return {k: v.as_subclass(HostTensor) for k, v in built(self, ids).items()}
    monkeypatch.setattr(MixtureDataset, "batch", batch)


def model(seed=0):
    torch.manual_seed(seed)
    return CheckedGPT(**TINY)


def session(plugins=(), interface=None, **kwargs):
    domains = synthetic_domains(24)
    val = MixtureDataset({k: v for k, v in synthetic_domains(6, seed=1).items()})
    target = MixtureDataset({"target": synthetic_domains(6, seed=2)["C"]})
    net = model()
    return DataFlex(domains, global_batch_size=8, plugins=list(plugins), seed=0,
                    interface=interface or TorchInterface(net), datasets={"val": val, "target": target},
                    probe_batch_size=5, **kwargs)


def train(flex, steps=2):
    """The recipe's loop: the back end moves the training batch to the model's device."""
    iface = flex.interface
    opt = torch.optim.SGD(iface.module.parameters(), lr=1e-2)
    flex.optimizer = opt
    records = []
    for _ in range(steps):
        batch = iface.to_device(flex.next_batch())
        loss = flex.loss(iface.module(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        records.append(flex.end_step())
    return records


def test_host_tensor_catches_a_batch_that_was_not_moved(host_batches):
    """The control: an interface that hands the host batch to the model as it is fails, in the forward."""
    class Forgetful(TorchInterface):
        def to_device(self, batch):
            return batch

    flex = session(interface=Forgetful(model()))
    with pytest.raises(HostMeetsDevice):
        flex.state.signals.probe(torch.arange(4))
    with pytest.raises(HostMeetsDevice):
        flex.state.signals.per_sample_grad_norms(torch.arange(4))
    # and a loss that mixes host labels with device logits
    batch = flex.data.batch(torch.arange(2))
    logits = model()(batch["input_ids"].to("cpu"), position_ids=batch["position_ids"].to("cpu"))
    with pytest.raises(HostMeetsDevice):
        flex.loss(logits, batch)


def test_every_signal_hands_the_model_tensors_on_its_device(host_batches):
    """Probes (each output), exact / projected / factored / sparse per-sample gradients, ghost norms and
    dots, the target gradient, validation and target losses: all on the model's device, results on the host."""
    flex = session()
    sig = flex.state.signals
    ids = torch.arange(0, 72, 7)
    for output in ("loss", "token_loss", "embedding", "el2n"):
        out = sig.probe(ids, output=output)
        assert out.shape[0] == len(ids) and out.device.type == "cpu" and torch.isfinite(out).all()
    assert sig.probe(ids, output="logits")[0].shape[-1] == TINY["vocab_size"]
    assert sig.probe(ids, output="outputs")
    exact = sig.per_sample_grads(ids[:3])
    assert exact.norms.shape == (3,)
    for projector in (RademacherProjector(dim=16, seed=0), FactoredProjector(dim=16, seed=0),
                      SparseProjector(dim=16, seed=0)):
        got = sig.per_sample_grads(ids[:3], projector=projector)
        assert got.projected.shape == (3, 16) and torch.isfinite(got.projected).all()
    norms = sig.per_sample_grad_norms(ids)
    torch.testing.assert_close(norms[:3], exact.norms, rtol=1e-4, atol=1e-6)
    target = sig.target_grad(torch.arange(4), dataset=flex.datasets["val"])
    dots = sig.per_sample_grad_dots(ids, target)
    assert dots.shape == (len(ids),) and torch.isfinite(dots).all()
    assert sig.per_sample_grad_dots(ids, torch.cat([t.flatten() for t in target.values()])).shape == (len(ids),)
    assert torch.isfinite(sig.val_loss()).all()
    assert set(flex.evaluate(flex.datasets["val"])) == {"A", "B", "C"}
    assert set(flex.target_loss(4)) == {"target"}
    records = train(flex)
    assert len(records[-1]["ledger"]["sample_id"]) == 8


def _plugins():
    from dataflex.mixers import AioliMixer, BanditMixer, DoReMiMixer
    from dataflex.reweighters import AnchorReweighter, LossReweighter, Rho1Reweighter
    from dataflex.selectors import GradNormSelector, LossSelector, RhoLossSelector, TracInSelector
    return {
        "bandit": lambda: [BanditMixer()],
        "aioli": lambda: [AioliMixer(lp_rounds=1, lp_steps=1, update_steps=4, val_samples=2)],
        "doremi": lambda: [DoReMiMixer(reference=model(1))],
        "loss-selector": lambda: [LossSelector(keep_fraction=0.5)],
        "rho": lambda: [RhoLossSelector(reference=model(1), keep_fraction=0.5)],
        "grand": lambda: [GradNormSelector(keep_fraction=0.5)],
        "el2n": lambda: [GradNormSelector(keep_fraction=0.5, score="el2n")],
        "tracin": lambda: [TracInSelector(keep_fraction=0.5, target_samples=4, normalize=True)],
        "loss-reweighter": lambda: [LossReweighter(burnout_steps=0)],
        "rho1": lambda: [Rho1Reweighter(reference=model(1))],
        "anchor": lambda: [AnchorReweighter(anchor_samples=4)],
        "all-three": lambda: [BanditMixer(), LossSelector(keep_fraction=0.5), LossReweighter(burnout_steps=0)],
    }


@pytest.mark.parametrize("name", list(_plugins()))
def test_each_plugin_family_runs_with_host_batches(host_batches, name):
    """Mixers, selectors and reweighters (reference models of DoReMi, RHO and Rho-1 included) through
    two training steps: every probe they make reaches the model on its device."""
    import dataflex.mixers  # noqa: F401  (registers the plugin modules)
    flex = session(_plugins()[name]())
    records = train(flex)
    assert [r["step"] for r in records] == [0, 1]
    assert all(len(r["ledger"]["sample_id"]) >= 8 for r in records)


def test_reference_follows_the_training_model_onto_its_device():
    """A reference dataflex wraps or loads is placed on the training model's device before its first
    probe (here the `meta` device stands for a GPU); a user's own interface is left where it is."""
    flex = DataFlex(synthetic_domains(8), global_batch_size=4, seed=0,
                    interface=TorchInterface(model().to("meta")))
    ref = as_reference(model(1))
    assert ref.device.type == "cpu" and ref.follows_training_device
    flex.state.signals._place_reference(ref)
    assert ref.device.type == "meta"
    mine = TorchInterface(model(2))
    flex.state.signals._place_reference(mine)
    assert mine.device.type == "cpu"


def test_interface_device_is_the_input_embedding_device():
    net = model()
    iface = TorchInterface(net)
    assert iface.device == torch.device("cpu")
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "note": "kept"}
    moved = TorchInterface(model().to("meta")).to_device(batch)
    assert moved["input_ids"].device.type == "meta" and moved["note"] == "kept"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
@pytest.mark.parametrize("name", ["signals"] + list(_plugins()))
def test_on_cuda(name):
    """The same paths with the model really on the GPU and batches built on the host."""
    flex = session(_plugins()[name]() if name != "signals" else (), interface=TorchInterface(model().cuda()))
    if name == "signals":
        sig, ids = flex.state.signals, torch.arange(0, 72, 7)
        for output in ("loss", "token_loss", "embedding", "el2n"):
            assert sig.probe(ids, output=output).device.type == "cpu"
        for projector in (None, RademacherProjector(dim=16, seed=0), FactoredProjector(dim=16, seed=0),
                          SparseProjector(dim=16, seed=0)):
            sig.per_sample_grads(ids[:3], projector=projector)
        target = sig.target_grad(torch.arange(4), dataset=flex.datasets["val"])
        assert sig.per_sample_grad_dots(ids, target).device.type == "cpu"
        flex.evaluate(flex.datasets["val"])
        flex.target_loss(4)
    records = train(flex)
    assert len(records) == 2
