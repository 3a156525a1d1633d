"""DataFlex: the sampler, the plugins and the loss wrapper wired into any training loop.

    flex = DataFlex(domains.train, global_batch_size=32, plugins=[BanditMixer()],
                    interface=TorchInterface(model))
    for step in range(max_steps):
        batch = flex.next_batch()                  # this rank's slice of the global batch
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        record = flex.end_step()                   # metrics and ledger rows of the step
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import torch

from . import dist
from .data import MixtureDataset, SampleSet
from .events import Event
from .grads import ParamSpec, PerSampleGrads
from .loss import LossWrapper
from .plugin import Engine, Plugin
from .projection import RademacherProjector
from .sampler import DataAwareSampler
from .state import DataState, per_domain_mean


class Signals:
    """The one interface plugins see: losses of the current batch, probes and gradients by id."""

    def __init__(self, flex: "DataFlex"):
        self.flex = flex

    def probe(self, ids: torch.Tensor, output: str = "loss", dataset: Optional[MixtureDataset] = None):
        """Forward without gradients on sample ids. Losses are split over ranks and gathered, so
        every rank gets all of them; logits and raw outputs come back for this rank's share only."""
        if self.flex.interface is None:
            raise RuntimeError("probing samples needs DataFlex(interface=...), e.g. TorchInterface(model)")
        data = dataset or self.flex.data
        ids = torch.as_tensor(ids)
        mine = self.flex.sampler.rank_slice(ids)
        chunk = self.flex.probe_batch_size
        per_rank = -(-len(ids) // self.flex.world_size)
        parts = []
        # every rank runs the same number of forwards: under ZeRO-3 each one is a collective
        for start in range(0, per_rank, chunk):
            part = mine[start:start + chunk]
            out = self.flex.interface.probe(data.batch(part if len(part) else ids[:1]), output)
            if len(part):
                parts.append(out)
        if output != "loss":
            return parts
        local = torch.cat(parts) if parts else torch.zeros(0)
        return dist.all_gather_cat(local.float().cpu())

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
        out.norms = dist.all_gather_cat(out.norms.float().cpu())
        if out.projected is not None:
            out.projected = dist.all_gather_cat(out.projected.float().cpu())
        return out


class DataFlex:
    def __init__(self, train: dict, global_batch_size: int, plugins: Iterable[Plugin] = (), interface=None,
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 initial_weights: str = "size", probe_batch_size: int = 64, check_ranks_every: int = 50):
        self.data = train if isinstance(train, MixtureDataset) else MixtureDataset(train)
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        if global_batch_size % self.world_size:
            raise ValueError(f"global batch size {global_batch_size} must divide by the {self.world_size} ranks")
        self.global_batch_size = global_batch_size
        self.interface, self.probe_batch_size = interface, probe_batch_size
        sizes = self.data.sizes
        start = torch.tensor(sizes, dtype=torch.float64) if initial_weights == "size" else None
        self.sampler = DataAwareSampler(sizes, seed, self.rank, self.world_size, start, self.data.names)
        self.state = DataState(self.data.names, sizes, global_batch_size, self.world_size)
        self.state.signals = Signals(self)
        self.engine = Engine(plugins, self.state)
        self.loss = LossWrapper(weigh=self._weigh)
        self.step = 0
        self.check_ranks_every = check_ranks_every
        self._started = False

    # -- the step ----------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self.engine.fire(Event.FIT_START)

    def next_batch(self) -> dict:
        self.start()
        s = self.state
        s.step, s.metrics = self.step, {}
        s.keep_mask = s.candidate_losses = s.losses = s.sample_weights = None
        s.domain_weights = None
        self.engine.fire(Event.BEFORE_SAMPLE)
        if s.domain_weights is not None:
            self.sampler.set_weights(s.domain_weights)
        for domain, mask in s.pool_masks.items():
            self.sampler.set_keep_mask(domain, mask)
        s.pool_masks = {}
        s.domain_weights = self.sampler.weights
        selector = self.engine.of("selector")
        n = round(self.global_batch_size * (selector.candidate_factor if selector else 1))
        s.candidate_ids = self.sampler.draw(n)
        s.candidate_domains = self.data.domain[s.candidate_ids]
        if selector:
            self.engine.fire(Event.AFTER_CANDIDATES)
            if int(s.keep_mask.sum()) != self.global_batch_size:
                raise RuntimeError(f"{selector.name} kept {int(s.keep_mask.sum())} samples, the global batch "
                                   f"is {self.global_batch_size}")
            s.batch_ids = s.candidate_ids[s.keep_mask]
        else:
            s.batch_ids = s.candidate_ids
        s.batch_domains = self.data.domain[s.batch_ids]
        return self.data.batch(self.sampler.rank_slice(s.batch_ids))

    def _weigh(self, per_sample: torch.Tensor, batch: dict) -> Optional[torch.Tensor]:
        self.state.losses = dist.all_gather_cat(per_sample.float().cpu())
        self.engine.fire(Event.AFTER_LOSS)
        if self.state.sample_weights is None:
            return None
        return self.sampler.rank_slice(self.state.sample_weights).to(per_sample.device)

    def end_step(self) -> dict:
        """Let mixers learn from the step; return its metrics and ledger rows."""
        s = self.state
        if s.losses is None:
            raise RuntimeError("end_step() before flex.loss(...): the step's per-sample losses are missing")
        self.engine.fire(Event.BATCH_END)
        record = {"step": self.step, "train_loss": float(s.losses.mean()),
                  "domain_weights": dict(zip(s.domains, s.domain_weights.tolist()))}
        means, present = s.domain_mean(s.losses, s.batch_domains)
        record["domain_loss"] = {d: float(means[i]) for i, d in enumerate(s.domains) if present[i]}
        if s.keep_mask is not None:
            record["selected_fraction"] = float(s.keep_mask.float().mean())
        record.update(s.metrics)
        record["ledger"] = self._ledger_rows()
        if self.world_size > 1 and self.check_ranks_every and self.step % self.check_ranks_every == 0:
            self._check_ranks_agree()
        self.step += 1
        return record

    def _check_ranks_agree(self) -> None:
        """Every rank must have drawn, kept and weighted the same global batch; a divergence (a
        plugin using an unseeded RNG, a rank-local signal) would silently train on other data."""
        s = self.state
        h = hashlib.sha256()
        for t in (s.domain_weights, s.batch_ids, s.sample_weights):
            if t is not None:
                h.update(t.detach().cpu().numpy().tobytes())
        digest = torch.tensor([int.from_bytes(h.digest()[:8], "little", signed=True)])
        everyone = dist.all_gather_cat(digest)
        if (everyone != everyone[0]).any():
            raise RuntimeError(f"ranks disagree on the data of step {self.step} (decision hashes "
                               f"{everyone.tolist()}): every plugin must decide from gathered signals and seeded RNGs")

    def _ledger_rows(self) -> dict:
        s = self.state
        B, per_rank = self.global_batch_size, self.global_batch_size // self.world_size
        kept = s.keep_mask if s.keep_mask is not None else torch.ones(len(s.candidate_ids), dtype=torch.bool)
        weights = s.sample_weights if s.sample_weights is not None else torch.ones(B, dtype=torch.float64)
        loss = torch.full((len(kept),), float("nan"), dtype=torch.float64)
        if s.candidate_losses is not None:
            loss[:] = s.candidate_losses.double()
        loss[kept] = s.losses.double()
        weight = torch.zeros(len(kept), dtype=torch.float64)
        weight[kept] = weights.double()
        rank = torch.full((len(kept),), -1, dtype=torch.long)
        rank[kept] = torch.arange(B) // per_rank
        return {"step": [self.step] * len(kept), "rank": rank.tolist(), "sample_id": s.candidate_ids.tolist(),
                "domain": [s.domains[d] for d in s.candidate_domains.tolist()], "selected": kept.tolist(),
                "weight": weight.tolist(), "loss": loss.tolist()}

    @torch.no_grad()
    def evaluate(self, val: MixtureDataset) -> dict:
        """Per-domain validation loss (mean over samples), then EVAL_END for the plugins."""
        losses = self.state.signals.probe(torch.arange(len(val)), dataset=val)
        means, present = per_domain_mean(losses, val.domain, len(val.names))
        result = {val.names[i]: float(means[i]) for i in range(len(val.names)) if present[i]}
        self.state.val_loss = {d: result[d] for d in self.state.domains if d in result}
        self.engine.fire(Event.EVAL_END)
        return result

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.start()
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.engine.load_state_dict(state["engine"])
