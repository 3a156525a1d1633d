"""The one interface between model and data: per-sample loss, per-sample gradients, probes.

Plugins never touch the model; they ask for these signals through the run's DataState. The same
calls work for a plain torch module and a DeepSpeed engine (ZeRO 0-2 for gradients; probes and
losses under every ZeRO stage, since the engine's own forward gathers partitioned parameters).

Gradient signals, cheapest first (see dataflex.grad.ghost and dataflex.grad.factored):

    per_sample_grad_norms(batch, params)           [B] exact norms, one forward + backward, no
                                                    per-sample gradient (ghost norm / Book-Keeping)
    per_sample_grad_dots(batch, target, params)    [B] or [B, K] exact <g_i, target> (ghost dots)
    per_sample_grads(batch, params, projector=FactoredProjector(d))    LoGra features [B, d]
    per_sample_grads(batch, params, projector=SparseProjector(d))      sparse JL of exact gradients
    per_sample_grads(batch, params, projector=RademacherProjector(d))  dense reference (LESS/TRAK)
    per_sample_grads(batch, params)                 exact [B, *shape] per parameter (torch.func)

All compute in eval mode (dropout off) unless `train_mode=True`.

Devices: every entry point first moves the batch (and a dots target) to `interface.device`, the
device of the model's input embedding (else its first parameter): batches built on the host (the
sampler's, `MixtureDataset.batch`) are handed to a model on a GPU as they should be. Results stay on
that device; `dataflex.session.signals.Signals` gathers them there and copies them to the host once.

Probes take packed batches too (several samples a row, `dataflex.core.packing`) for the per-sample
outputs (`PACKED_OUTPUTS`): each sample's result is reduced over its own token slots, and token losses come
back per sample ([S, T], token p at column p), what its padded row gives.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from dataflex.core.loss import el2n, el2n_tokens, per_sample_from_token_loss, per_token_loss
from dataflex.core.packing import Segments
from dataflex.grad import ghost
from dataflex.grad.api import hook_projected_grads, per_sample_grads
from dataflex.grad.factored import factored_grads
from dataflex.grad.fallback import guarded_per_sample_grads
from dataflex.grad.params import ParamSpec, PerSampleGrads, refuse_packed
from dataflex.models.forward import default_forward
from dataflex.models.hf import forward_for
from dataflex.models.lean import lean_forward, offers_lean

OUTPUTS = ("loss", "token_loss", "embedding", "el2n", "logits", "outputs")
PACKED_OUTPUTS = ("loss", "token_loss", "embedding", "el2n")     # per sample: a packed batch gives them too


def last_hidden_module(module: torch.nn.Module) -> torch.nn.Module:
    """The output head, whose input is the last hidden state: HF's `get_output_embeddings()`, else
    the last Linear layer registered."""
    getter = getattr(module, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("probe(output='embedding') needs a model with a Linear output head")
        head = linears[-1]
    return head


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a model takes its inputs: its input embedding's device (HF models spread over devices take
    their inputs where the embedding is), else its first parameter's or buffer's, else the CPU."""
    getter = getattr(module, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        emb = None
    for source in ((emb.parameters() if emb is not None else ()), module.parameters(), module.buffers()):
        for t in source:
            return t.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (non-blocking from pinned memory; a no-op where they already are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def target_to_device(target, device: torch.device):
    if isinstance(target, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    return target.to(device, non_blocking=True) if isinstance(target, torch.Tensor) else target


class TorchInterface:
    probes_packed = True        # probe() takes packed batches for PACKED_OUTPUTS (Signals packs its probes)
    # a reference model dataflex loaded or wrapped (`as_reference`): Signals places it on the training
    # model's device before its first probe; a user's own interface stays where the user put it
    follows_training_device = False

    def __init__(self, module: torch.nn.Module, forward: Callable = default_forward, lean: bool = True):
        self.module = module
        self.lean = lean        # loss probes from the hidden states and the head, no [B, T, V] logits (core.lean_loss)
        # HF / peft models get dataflex.models.hf's forward (use_cache=False, logits, vmap-safe masks)
        self.forward = forward_for(module) if forward is default_forward else forward

    @property
    def device(self) -> torch.device:
        """The device the model takes its inputs on (see `module_device`)."""
        return module_device(self.module)

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device)

    def place_on(self, device: torch.device) -> None:
        """Move the model to `device` (a frozen reference following the training model)."""
        if self.device != torch.device(device):
            self.module.to(device)

    def _call(self):
        return self.module

    @torch.no_grad()
    def probe(self, batch: dict, output: str = "loss"):
        """Forward without gradients: per-sample losses, per-token losses ([B, T], 0 off the loss
        mask), embeddings (the last hidden state averaged over the label tokens, [B, d]), logits,
        or the model's raw outputs. A packed batch: B counts samples, for `PACKED_OUTPUTS` only."""
        if output not in OUTPUTS:
            raise ValueError(f"probe output must be one of {OUTPUTS}, got {output!r}")
        seg = Segments.of(batch)
        if output not in PACKED_OUTPUTS:
            refuse_packed(batch, f"probe(output={output!r})")
        batch = self.to_device(batch)
        was_training = self.module.training
        self.module.eval()
        captured, hook = [], None
        if output == "embedding":
            hook = last_hidden_module(self.module).register_forward_pre_hook(
                lambda _m, args: captured.append(args[0].detach()))
        try:
            if output == "outputs":
                return self._call()(batch["input_ids"], position_ids=batch["position_ids"])
            logits = None
            if self.lean and output in ("loss", "token_loss"):     # None where the model offers no head
                logits = lean_forward(self.forward, self._call(), batch)
            if logits is None:
                logits = self.forward(self._call(), batch)
            if output == "logits":
                return logits
            mask = batch["loss_mask"].float()
            if seg is not None:      # packed: each sample's mean over its own label tokens
                return _packed_probe(seg, output, logits, captured, batch, mask)
            if output == "embedding":
                h = captured[-1].float()
                return (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            if output == "el2n":      # GraNd's proxy (Paul et al. 2021): mean over label tokens of ||p - e_y||
                return el2n(getattr(logits, "logits", logits), batch["labels"], mask).float()
            token_loss = per_token_loss(logits, batch["labels"])
            if output == "token_loss":
                return (token_loss * mask).float()
            return per_sample_from_token_loss(token_loss, mask).float()
        finally:
            if hook is not None:
                hook.remove()
            self.module.train(was_training)

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        return self.probe(batch, "loss")

    def _hook_call(self):
        """What runs the forward of the hook engine (ghost signals, FactoredProjector)."""
        return None

    def per_sample_grads(self, batch: dict, params: ParamSpec = "all", projector=None, chunk_size: int = 16,
                         train_mode: bool = False) -> PerSampleGrads:
        batch = self.to_device(batch)
        if getattr(projector, "factored", False):
            return factored_grads(self.module, batch, params, projector, chunk_size, self.forward, train_mode,
                                  self._hook_call(), self.lean)
        if getattr(projector, "engine", None) == "hooks":      # SparseProjector over the hook engine
            return hook_projected_grads(self.module, batch, params, projector, chunk_size, self.forward,
                                        train_mode, self._hook_call(), self.lean)
        if projector is None and self.lean and offers_lean(self.module):
            # exact gradients from the hook engine on the lean path: the head's per-sample gradient is
            # formed a vocabulary chunk at a time (factors.HeadFactor), no [B, T, V] logits
            return hook_projected_grads(self.module, batch, params, None, chunk_size, self.forward,
                                        train_mode, self._hook_call(), True)
        # exact per-sample loop where torch.func cannot go (dataflex.grad.fallback), with a one-line warning
        return guarded_per_sample_grads(self.module, batch, params, projector, chunk_size, self.forward, train_mode,
                                        per_sample_grads)

    def per_sample_grad_norms(self, batch: dict, params: ParamSpec = "all", chunk_size: Optional[int] = None,
                              train_mode: bool = False) -> torch.Tensor:
        """[B] exact per-sample gradient norms over the chosen parameters, float32."""
        batch = self.to_device(batch)
        return ghost.per_sample_grad_norms(self.module, batch, params, self.forward, chunk_size, train_mode,
                                           self._hook_call(), self.lean)

    def per_sample_grad_dots(self, batch: dict, target, params: ParamSpec = "all", chunk_size: Optional[int] = None,
                             train_mode: bool = False) -> torch.Tensor:
        """<g_i, target>: [B] for one target, [B, K] for K; `target` is name -> tensor or a flat
        vector in the order of select_params (see dataflex.grad.ghost.per_sample_grad_dots)."""
        device = self.device
        batch, target = to_device(batch, device), target_to_device(target, device)
        return ghost.per_sample_grad_dots(self.module, batch, target, params, self.forward, chunk_size, train_mode,
                                          self._hook_call(), self.lean)

    def batch_grad(self, batch: dict, params: ParamSpec = "all", reduction: str = "mean") -> dict:
        """name -> gradient of the batch's mean (or summed) per-sample loss: a target for dots."""
        batch = self.to_device(batch)
        return ghost.batch_grad(self.module, batch, params, self.forward, reduction)


def _packed_probe(seg: Segments, output: str, logits, captured: list, batch: dict, mask: torch.Tensor):
    """A probe's per-sample output from packed rows: the padded formulas, each sample's sums over its slots."""
    count = seg.sum(mask).clamp(min=1)
    if output == "embedding":
        return seg.sum(captured[-1].float() * mask.unsqueeze(-1)) / count.unsqueeze(-1)
    if output == "el2n":
        return (seg.sum(el2n_tokens(getattr(logits, "logits", logits), batch["labels"]) * mask.double())
                / count.double()).float()
    token_loss = per_token_loss(logits, batch["labels"]) * mask
    if output == "token_loss":
        return seg.unpack(token_loss.float())
    return (seg.sum(token_loss) / count).float()


_REFERENCE_LOADERS: list = []     # set by dataflex.run.reference: a run folder or checkpoint -> TorchInterface


def register_reference_loader(loader: Callable) -> None:
    """`loader(path, vocab_size)`: how a reference given as a path is loaded (the run layer's, which knows run
    folders and checkpoints). Plugins stay unaware of run folders."""
    _REFERENCE_LOADERS[:] = [loader]


def as_reference(reference, vocab_size: Optional[int] = None) -> Optional[TorchInterface]:
    """A plugin's `reference=` argument: None, a module, an interface, or a run or checkpoint path (loaded by
    the registered loader: `dataflex.run.reference.load_reference`, registered when that module is imported)."""
    if reference is None or isinstance(reference, TorchInterface):
        return reference
    if isinstance(reference, torch.nn.Module):
        interface = TorchInterface(reference.eval().requires_grad_(False))
        interface.follows_training_device = True
        return interface
    if not _REFERENCE_LOADERS:
        raise TypeError(f"reference={reference!r}: a path needs the run layer's loader; pass "
                        "dataflex.run.reference.load_reference(PATH) (or import dataflex.run.reference first)")
    interface = _REFERENCE_LOADERS[0](reference, vocab_size)
    interface.follows_training_device = True
    return interface
