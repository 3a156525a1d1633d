"""Signals: the one interface plugins see (`state.signals`): losses, probes, gradients and the
optimizer's state, by sample id, split over ranks and gathered so every rank decides the same.

Devices: batches are built on the host (`MixtureDataset.batch`) and the interface moves them to its
model's device; a reference model dataflex loaded (`as_reference`) is placed on the training model's
device before its first probe. Per-sample results are gathered on the device they were computed on
and copied to the host once (plugins and the ledger work on host tensors).

Packed probes: in a run that packs (`DataFlex(packing=True)`, `pack_probes` not False), each chunk of probed
samples is packed into as few rows of seq_len slots as hold it (best-fit decreasing, `pack_probe`) when that
takes fewer rows than one a row, for the per-sample outputs (`PACKED_OUTPUTS`: losses, token losses,
embeddings, EL2N) of an interface that takes packed rows (`probes_packed`); each sample's result is that of
its padded row (attention stays within a sample, positions restart) up to float rounding, in the order asked.
A chunk of samples as long as seq_len (nothing to gain) runs padded. Logits and raw outputs stay padded."""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from dataflex.core.packing import plan_rows
from dataflex.core.state import per_domain_mean
from dataflex.data.mixture import MixtureDataset
from dataflex.grad.interface import PACKED_OUTPUTS
from dataflex.grad.params import ParamSpec, PerSampleGrads, select_params
from dataflex.grad.projection import RademacherProjector
from dataflex.utils import dist


class SessionView(Protocol):
    """What Signals reads of the session that owns it (DataFlex): the data, the model's interface, the
    sampler's rank split and the optimizer. Signals never imports the session."""
    data: MixtureDataset
    datasets: dict
    interface: object
    optimizer: object
    sampler: object
    state: object
    probe_batch_size: int
    world_size: int
    pack_probes: bool

GATHERED_OUTPUTS = ("loss", "token_loss", "embedding", "el2n")


def as_mixture(name: str, data) -> MixtureDataset:
    """A MixtureDataset, a {domain: SampleSet} dict, or one SampleSet (one domain named `name`)."""
    if isinstance(data, MixtureDataset):
        return data
    return MixtureDataset(data if isinstance(data, dict) else {name: data})


def pack_probe(data: MixtureDataset, ids: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
    """(order, packed batch) of the samples `ids` in as few rows of seq_len slots as hold them: best-fit
    decreasing (every sample fits, with one row a sample at most); the batch's sample i is `ids[order[i]]`.
    None when packing takes as many rows as samples (nothing to gain)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    lengths = data.lengths(ids)
    plan = plan_rows(range(len(ids)), None, lambda i: lengths[i], len(ids), data.seq_len)
    rows = int(plan.rows.max()) + 1 if len(plan.rows) else 0
    if rows >= len(ids):
        return None
    return plan.ids, data.packed_batch(ids[plan.ids], plan.rows, plan.offsets, rows)


def host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the host: one device-to-host copy (a no-op for a CPU tensor)."""
    return t.cpu()


class Signals:
    """The one interface plugins see: losses of the current batch, probes and gradients by id."""

    def __init__(self, flex: SessionView):
        self.flex = flex

    def sample_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Label tokens of training samples `ids` (global ids): the token slots each takes in a packed row."""
        return torch.as_tensor(self.flex.data.lengths(torch.as_tensor(ids, dtype=torch.long)))

    @property
    def seq_len(self) -> int:
        """Token slots of a row (the training data's sample length)."""
        return int(self.flex.data.seq_len)

    def dataset(self, name: str) -> Optional[MixtureDataset]:
        """A dataset the run was given besides training (`DataFlex(datasets={"val": .., "target": ..})`)."""
        return self.flex.datasets.get(name)

    def val_loss(self, dataset: str = "val", max_per_domain: Optional[int] = None) -> torch.Tensor:
        """Per-domain mean probe loss on a held-out dataset (default the run's `val`), [K] float64 in
        training-domain order, NaN for a domain it lacks; the first `max_per_domain` samples of each
        domain when given. Mixers call it on their own schedule (Aioli's LearnParams)."""
        data = self.dataset(dataset)
        if data is None:
            raise RuntimeError(f"this mixer needs a {dataset!r} dataset: DataFlex(datasets={{{dataset!r}: ...}}) "
                               "(launch/train.py passes the data config's val splits)")
        ids = torch.arange(len(data))
        if max_per_domain is not None:
            starts = [sum(data.sizes[:k]) for k in range(len(data.sizes))]
            ids = torch.cat([torch.arange(s, s + min(n, max_per_domain)) for s, n in zip(starts, data.sizes)])
        means, present = per_domain_mean(self.probe(ids, dataset=data), data.domain[ids], len(data.names))
        out = torch.full((len(self.flex.state.domains),), float("nan"), dtype=torch.float64)
        for i, name in enumerate(self.flex.state.domains):
            if name in data.names and present[data.names.index(name)]:
                out[i] = means[data.names.index(name)]
        return out

    def probe(self, ids: torch.Tensor, output: str = "loss", dataset: Optional[MixtureDataset] = None,
              interface=None):
        """Forward without gradients on sample ids. Losses ([n]), token losses ([n, T]) and
        embeddings ([n, d]) are split over ranks and gathered, so every rank gets all of them;
        logits and raw outputs come back for this rank's share only. `interface` probes another
        model (a reference model) on the same samples."""
        interface = interface or self.flex.interface
        if interface is None:
            raise RuntimeError("probing samples needs DataFlex(interface=...), e.g. TorchInterface(model)")
        if interface is not self.flex.interface:
            self._place_reference(interface)
        data = dataset or self.flex.data
        ids = torch.as_tensor(ids)
        mine = self.flex.sampler.rank_slice(ids)
        chunk = self.flex.probe_batch_size
        per_rank = -(-len(ids) // self.flex.world_size)
        parts = []
        # every rank runs the same number of forwards: under ZeRO-3 each one is a collective
        for start in range(0, per_rank, chunk):
            part = mine[start:start + chunk]
            out = self._probe_chunk(interface, data, part if len(part) else ids[:1], output)
            if len(part):
                parts.append(out)
        if output not in GATHERED_OUTPUTS:
            return parts
        local = torch.cat(parts) if parts else torch.zeros(0, device=getattr(interface, "device", "cpu"))
        return host(dist.all_gather_cat(local.float()))

    def _probe_chunk(self, interface, data: MixtureDataset, ids: torch.Tensor, output: str):
        """interface.probe on the samples `ids`, results in their order: packed where it takes fewer rows
        (module docstring), else one sample a row."""
        packed = None
        if (output in PACKED_OUTPUTS and getattr(self.flex, "pack_probes", False)
                and getattr(interface, "probes_packed", False) and len(ids) > 1):
            packed = pack_probe(data, ids)
        if packed is None:
            return interface.probe(data.batch(ids), output)
        order, batch = packed
        out = interface.probe(batch, output)
        back = torch.empty_like(out)
        back[order.to(out.device)] = out
        return back

    def _place_reference(self, interface) -> None:
        """A reference model dataflex loaded follows the training model onto its device (once)."""
        main = self.flex.interface
        if getattr(interface, "follows_training_device", False) and main is not None and hasattr(main, "device"):
            interface.place_on(main.device)

    def per_sample_grads(self, ids: torch.Tensor, params: ParamSpec = "all",
                         projector: Optional[RademacherProjector] = None) -> PerSampleGrads:
        """Per-sample gradients of the samples `ids`. Norms and projections are gathered over
        ranks; full gradients are only returned in a single process (they are B x P)."""
        if self.flex.interface is None:
            raise RuntimeError("per-sample gradients need DataFlex(interface=...)")
        if projector is None and self.flex.world_size > 1:
            raise ValueError("full per-sample gradients stay on one rank: pass a projector, or read .norms")
        batch = self.flex.data.batch(self.flex.sampler.rank_slice(torch.as_tensor(ids)))
        out = self.flex.interface.per_sample_grads(batch, params, projector)
        out.norms = host(dist.all_gather_cat(out.norms.float()))
        if out.projected is not None:
            out.projected = host(dist.all_gather_cat(out.projected.float()))
        return out

    def _ghost(self, ids: torch.Tensor, fn) -> torch.Tensor:
        """fn(batch) on this rank's share of `ids`, gathered. A rank with no share still runs one
        call (on the first id, dropped): under ZeRO-3 every forward is a collective."""
        if self.flex.interface is None:
            raise RuntimeError("gradient signals need DataFlex(interface=...)")
        ids = torch.as_tensor(ids)
        mine = self.flex.sampler.rank_slice(ids)
        out = fn(self.flex.data.batch(mine if len(mine) else ids[:1])).float()
        return host(dist.all_gather_cat(out if len(mine) else out[:0]))

    def per_sample_grad_norms(self, ids: torch.Tensor, params: ParamSpec = "all") -> torch.Tensor:
        """[n] exact per-sample gradient norms of the samples `ids` (ghost norms: no per-sample
        gradient is materialised), split over ranks and gathered."""
        return self._ghost(ids, lambda batch: self.flex.interface.per_sample_grad_norms(batch, params))

    def per_sample_grad_dots(self, ids: torch.Tensor, target, params: ParamSpec = "all") -> torch.Tensor:
        """[n] (or [n, K]) inner products of each sample's gradient with `target` (name -> tensor,
        or a flat vector; e.g. `self.target_grad(val_ids)`), split over ranks and gathered."""
        return self._ghost(ids, lambda batch: self.flex.interface.per_sample_grad_dots(batch, target, params))

    def target_grad(self, ids: torch.Tensor, params: ParamSpec = "all", dataset: Optional[MixtureDataset] = None
                    ) -> dict:
        """name -> gradient of the mean loss over the samples `ids` (of `dataset`, default the
        training data), averaged over ranks (weighted by their share): the same on every rank."""
        if self.flex.interface is None:
            raise RuntimeError("gradient signals need DataFlex(interface=...)")
        ids = torch.as_tensor(ids)
        mine = self.flex.sampler.rank_slice(ids)
        data = dataset or self.flex.data
        grads = self.flex.interface.batch_grad(data.batch(mine if len(mine) else ids[:1]), params, "sum")
        out = {}
        for name, g in grads.items():
            g = g.float() * (1.0 if len(mine) else 0.0)
            out[name] = host(dist.all_gather_cat(g.unsqueeze(0)).sum(0) / len(ids))
        return out

    def optimizer_state(self, params: ParamSpec = "all", moments: bool = True) -> dict:
        """The Adam state of the chosen parameters, read from `DataFlex(optimizer=...)` (never changed):
        {"state": {name: {"exp_avg": m, "exp_avg_sq": v}} (float32, CPU; zeros before the first step),
        "betas": (b1, b2), "eps", "lr" (the learning rate the next step uses), "step"}. `moments=False`
        leaves "state" out (cheap: the learning rate alone).

        Parameters map to optimizer state by the identity of the parameter tensors: a torch optimizer,
        or DeepSpeed's basic optimizer under ZeRO 0 in fp32 (`engine.optimizer`, or a wrapper's
        `.optimizer`). Under ZeRO 1/2 and bf16 the state lives in flat fp32 partitions; it is assembled
        per parameter with DeepSpeed's `safe_get_full_optimizer_state` (a collective: every rank calls
        it, as every rank runs the plugins). Anything else raises."""
        opt = self.flex.optimizer
        if opt is None:
            raise RuntimeError("the optimizer state needs DataFlex(optimizer=...) (launch/train.py passes the "
                               "back end's optimizer)")
        module = getattr(self.flex.interface, "module", None)
        if module is None:
            raise RuntimeError("the optimizer state needs DataFlex(interface=...) to name the parameters")
        chosen = select_params(module, params)
        candidates = [o for o in (opt, getattr(opt, "optimizer", None)) if o is not None and hasattr(o, "param_groups")]

        def group_of(p):
            for o in candidates:
                for group in o.param_groups:
                    if any(q is p for q in group["params"]):
                        return o, group
            return None, None

        groups, state, steps = [], {}, []
        for name, p in chosen.items():
            o, group = group_of(p)
            if group is None and (hasattr(p, "_hp_mapping") or hasattr(p, "ds_id")):
                group = candidates[0].param_groups[0] if candidates else None   # ZeRO: flat groups
                if candidates and len({(tuple(g.get("betas", ())), g.get("eps"), g.get("lr"))
                                       for g in candidates[0].param_groups}) > 1:
                    raise NotImplementedError(f"parameter {name!r}: DeepSpeed's partitioned optimizer has param "
                                              "groups with different betas/eps/lr; cannot tell which is its own")
            if group is None:
                raise ValueError(f"parameter {name!r} is not trained by the optimizer {type(opt).__name__} "
                                 "(or its state is held in a form that cannot be mapped to it)")
            if "betas" not in group or "eps" not in group:
                raise ValueError(f"optimizer {type(opt).__name__} has no Adam betas/eps (LESS's features need Adam)")
            groups.append(group)
            if not moments:
                continue
            if o is not None:
                st = o.state.get(p, {})
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
                if "step" in st:
                    steps.append(int(torch.as_tensor(st["step"]).item()))
            else:     # ZeRO's flat partitions: the back end's interface assembles them (a collective)
                full = getattr(self.flex.interface, "full_optimizer_state", None)
                if full is None:
                    raise ValueError(f"parameter {name!r}: its optimizer state is partitioned and the interface "
                                     f"{type(self.flex.interface).__name__} cannot assemble it")
                m, v = full(p, "exp_avg"), full(p, "exp_avg_sq")
            zeros = torch.zeros(p.shape, dtype=torch.float32)
            state[name] = {"exp_avg": zeros if m is None else m.detach().float().cpu().reshape(p.shape),
                           "exp_avg_sq": zeros.clone() if v is None else v.detach().float().cpu().reshape(p.shape)}
        first = groups[0]
        for name, g in zip(chosen, groups):
            if tuple(g["betas"]) != tuple(first["betas"]) or g["eps"] != first["eps"] or g["lr"] != first["lr"]:
                raise ValueError(f"the chosen parameters sit in optimizer groups with different betas/eps/lr "
                                 f"({name!r}); choose parameters of one group")
        out = {"betas": tuple(float(b) for b in first["betas"]), "eps": float(first["eps"]), "lr": float(first["lr"]),
               "step": max(steps) if steps else 0}
        if moments:
            out["state"] = state
        return out
