"""DataFlex: the sampler, the plugins and the loss wrapper wired into any training loop.

    flex = DataFlex(domains.train, global_batch_size=32, plugins=[BanditMixer()],
                    interface=TorchInterface(model))
    for step in range(max_steps):
        batch = flex.next_batch()                  # this rank's slice of the global batch
        loss = flex.loss(model(batch["input_ids"], position_ids=batch["position_ids"]), batch)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        record = flex.end_step()                   # metrics and ledger rows of the step

`packing=True`: each step fills `global_batch_size` rows of seq_len token slots with several samples
back to back (dataflex.core.packing: best-fit decreasing, position ids restarting at each sample, what does not
fit waits in the sampler's state for the next step). Every per-sample signal stays per sample.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from dataflex.core.events import Event
from dataflex.core.loss import LossWrapper
from dataflex.core.packing import Segments, plan_rows
from dataflex.core.plugin import Engine, Plugin
from dataflex.core.sampler import DataAwareSampler
from dataflex.core.state import DataState, per_domain_mean
from dataflex.core.targets import evenly_spaced
from dataflex.data.domains import MixtureDataset
from dataflex.session.ledger import ledger_rows, packed_ledger_rows, token_metrics
from dataflex.session.micro import MicroBatches
from dataflex.session.rank_check import check_ranks_agree, compare_digests, decision_digest, digest
from dataflex.session.signals import Signals, as_mixture
from dataflex.session.weighting import checked_token_weights, compose_sample_weights, lr_note
from dataflex.utils import dist

NONFINITE = ("drop", "stop", "skip")   # a NaN/inf loss: weight 0 and train on | stop the run | skip the step
class DataFlex:
    def __init__(self, train: dict, global_batch_size: int, plugins: Iterable[Plugin] = (), interface=None,
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                 initial_weights: str = "size", probe_batch_size: int = 64, check_ranks_every: int = 0,
                 loss_reduction: str = "token", datasets: Optional[dict] = None, optimizer=None,
                 nonfinite: str = "drop", tokenizer=None, packing: bool = False, pack_lookahead: int = 16,
                 pack_probes: Optional[bool] = None):
        self.optimizer = optimizer      # the training optimizer, read (never stepped) by Signals.optimizer_state
        self.tokenizer = tokenizer      # the run's tokenizer: plugins that read text (embedding selectors) decode with it
        self.data = train if isinstance(train, MixtureDataset) else MixtureDataset(train)
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        if global_batch_size % self.world_size:
            raise ValueError(f"global batch size {global_batch_size} must divide by the {self.world_size} ranks")
        self.global_batch_size = global_batch_size
        self.interface, self.probe_batch_size = interface, probe_batch_size
        sizes = self.data.sizes
        start = torch.tensor(sizes, dtype=torch.float64) if initial_weights == "size" else None
        self._size_weights = initial_weights == "size"
        self.sampler = DataAwareSampler(sizes, seed, self.rank, self.world_size, start, self.data.names,
                                        lengths=self.data.lengths)
        self.state = DataState(self.data.names, sizes, global_batch_size, self.world_size, packing=bool(packing))
        self.state.signals = Signals(self)
        self.engine = Engine(plugins, self.state)
        self.loss = LossWrapper(weigh=self._weigh, reduction=loss_reduction)
        self.loss.known_weights = self._known_weights     # the lean loss's hint (dataflex.core.loss.loss_grad_hint)
        self.datasets = {k: as_mixture(k, v) for k, v in (datasets or {}).items() if v is not None}
        self._needs_tokens = any(getattr(p, "needs_token_losses", False) for p in self.engine.plugins)
        self.packing, self.pack_lookahead = bool(packing), int(pack_lookahead)
        self.pack_probes = self.packing if pack_probes is None else bool(pack_probes)   # Signals' probes packed
        self._token_totals = {"tokens": 0.0, "domain": [0.0] * len(sizes), "expected": [0.0] * len(sizes)}
        self.loss.token_signal = self._needs_tokens     # packed batches unpack token losses only when read
        self._plan, self._share = None, None
        self._weights = None
        self._micro = None      # the step's micro-batches seen so far (session/micro.py)
        self._last_weights_digest = b""
        if nonfinite not in NONFINITE:
            raise ValueError(f"trainer.nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.nonfinite, self.skip_step, self.skipped_steps = nonfinite, False, 0
        self.step = 0
        self.check_ranks_every = check_ranks_every
        self._started = False

    # -- the step ----------------------------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            self.state.domain_mean_tokens = self.sampler.mean_tokens()
            self.engine.fire(Event.FIT_START)

    def next_batch(self) -> dict:
        self.start()
        s = self.state
        s.step, s.metrics = self.step, {}
        s.keep_mask = s.candidate_losses = s.losses = s.sample_weights = s.batch_rows = None
        s.token_losses = s.token_mask = s.token_weights = s.domain_loss_weights = None
        self._weights = None
        s.domain_weights, s.weight_unit = None, "sample"
        s.domain_mean_tokens = self.sampler.mean_tokens()       # cached by the sampler until a pool changes
        self.engine.fire(Event.BEFORE_SAMPLE)
        # weights and pool masks apply together and are validated together (a domain masked to nothing
        # can come back); without a mixer, domains are drawn in proportion to what their pools keep
        masks, s.pool_masks = s.pool_masks, {}
        follow_pool = bool(masks) and s.domain_weights is None and self._size_weights \
            and self.engine.of("mixer") is None
        if s.domain_weights is not None or masks:
            self.sampler.set_pool(s.domain_weights, masks, proportional=follow_pool, unit=s.weight_unit)
            if self.sampler.withdrawn:    # waiting samples the new pool excludes: never trained, counted here
                s.metrics["pack/withdrawn"] = len(self.sampler.withdrawn)
        s.domain_weights, s.weight_unit = self.sampler.target, self.sampler.unit     # in the mixer's unit
        s.draw_probabilities = self.sampler.weights                                 # per drawn sample
        selector = self.engine.of("selector")
        if self.packing:
            return self._next_packed(selector)
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
        batch = self.data.batch(self.sampler.rank_slice(s.batch_ids))
        self._micro = MicroBatches(batch["loss_mask"].sum(-1))      # host: the micro-batch path's denominator
        return batch

    def _next_packed(self, selector) -> dict:
        """The packed step: samples waiting from the last step first, then fresh draws, best-fit decreasing into
        `global_batch_size` rows. With a selector, the fresh samples that would fill the rows set how many
        it keeps (k), its candidates are those k and (candidate_factor - 1) k more draws, and the kept ones
        are packed after the waiting ones; kept samples that do not fit wait for the next step."""
        s, T, R = self.state, self.data.seq_len, self.global_batch_size
        pending = list(self.sampler.pending)
        if selector is None:
            plan = plan_rows(pending, self.sampler.draw, self.data.lengths, R, T, self.pack_lookahead)
            s.candidate_ids = plan.ids
        else:
            fresh = []

            def draw(n):
                fresh.append(self.sampler.draw(n))
                return fresh[-1]
            plan_rows(pending, draw, self.data.lengths, R, T, self.pack_lookahead)      # sizes the step: k
            fresh = torch.cat(fresh) if fresh else torch.zeros(0, dtype=torch.long)
            k = len(fresh)
            extra = max(0, round(k * selector.candidate_factor) - k)
            s.candidate_ids = torch.cat([fresh, self.sampler.draw(extra)]) if extra else fresh
            s.candidate_domains = self.data.domain[s.candidate_ids]
            s.global_batch_size = k
            try:
                if k:
                    self.engine.fire(Event.AFTER_CANDIDATES)
                else:
                    s.keep_mask = torch.zeros(0, dtype=torch.bool)
            finally:
                s.global_batch_size = R
            if int(s.keep_mask.sum()) != k:
                raise RuntimeError(f"{selector.name} kept {int(s.keep_mask.sum())} samples, the packed step "
                                   f"asked for {k}")
            kept = s.candidate_ids[s.keep_mask].tolist()
            plan = plan_rows(pending + kept, None, self.data.lengths, R, T)
        self.sampler.pending = plan.carry
        s.candidate_domains = self.data.domain[s.candidate_ids]
        s.batch_ids, s.batch_rows = plan.ids, plan.rows
        s.batch_domains = self.data.domain[s.batch_ids]
        self._plan = plan
        r0, r1, a, b = plan.rank_bounds(self.rank, self.world_size)
        self._share = (a, b)
        batch = self.data.packed_batch(plan.ids[a:b], plan.rows[a:b], plan.offsets[a:b], r1 - r0, r0)
        self._micro = MicroBatches(Segments.of(batch).sum(batch["loss_mask"]), r1 - r0)   # per sample, and the rows
        return batch

    def _mine(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of a per-sample tensor of the global batch (its rows' samples when packed)."""
        if self.packing:
            return x[self._share[0]:self._share[1]]
        return self.sampler.rank_slice(x)

    def _known_weights(self, batch: dict) -> Optional[dict]:
        """The sample weights `_weigh` will give this batch when they are known before its losses: no plugin weighs
        by the step's losses (AFTER_LOSS) or its token losses, or the one that does sets token weights computed
        elementwise from each token's own loss (`Reweighter.token_weights_of_loss`, focal's; token reduction),
        given as `token_weights_of_loss`; the mixer's domain loss weights apply, to the whole local batch or to the
        micro-batch fed next (`dataflex.session.micro`). None otherwise. Only a hint for the lean loss (a wrong one
        costs time, not exactness)."""
        s = self.state
        after = [p for p in self.engine.plugins if Event.AFTER_LOSS in getattr(p, "events", ())]
        of_loss = None
        if len(after) == 1 and self.loss.reduction == "token" and hasattr(after[0], "token_weights_of_loss"):
            of_loss = after[0].token_weights_of_loss(s)
        if (self._needs_tokens or after) and of_loss is None:
            return None
        if s.batch_domains is None or s.sample_weights is not None:
            return None
        n = len(batch["sample_id"]) if "sample_id" in batch else len(batch["labels"])
        weights = compose_sample_weights(s, torch.ones(len(s.batch_domains), dtype=torch.bool))
        mine = self._mine(weights)
        if self._micro is not None and self._micro.splits(n):      # the next n samples of the local batch
            mine = mine[self._micro.rows:self._micro.rows + n]     # (the micro-batch's scale is one factor)
        if len(mine) != n:
            return None
        known = {"sample_weights": mine.float().to(batch["loss_mask"].device)}
        return known if of_loss is None else {**known, "token_weights_of_loss": of_loss}

    def _weigh(self, signal: dict, batch: dict) -> dict:
        """AFTER_LOSS: gather the step's losses, let reweighters weigh them, compose every weight.

        The sample weight is the product of what the families set, in this order: the mixer's
        domain loss weights (`apply=loss`), the reweighter's sample weights, and 0 for a sample
        whose loss is not finite; token weights (a token-level reweighter) multiply on top. The
        loss wrapper normalises by the weights' global total (`dataflex.core.loss.reduce_loss`)."""
        s = self.state
        if self._micro is not None and self._micro.splits(len(signal["loss"])):
            return self._micro.weigh(self, signal, batch)
        # one gather on the loss's device and one copy to the host: the step's only synchronisation
        device = signal["loss"].device
        label_tokens = (signal["labels"].to(device, non_blocking=True).float() if "labels" in signal   # packed rows
                        else batch["loss_mask"].to(device, non_blocking=True).sum(-1).float())
        n = len(label_tokens)
        decisions = torch.tensor(decision_digest(s, self._last_weights_digest), dtype=torch.float32).expand(n, 4)
        local = torch.cat([torch.stack([signal["loss"].float(), signal["tokens"].float(), label_tokens], 1),
                           decisions.to(device, non_blocking=True)], 1)
        gathered = dist.all_gather_cat(local).cpu()
        losses, tokens, labels = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        if self.world_size > 1:
            compare_digests(gathered, n, self.step)
        finite = self._settle_losses(losses, tokens, labels)
        if self._needs_tokens:
            s.token_losses = dist.all_gather_cat(signal["token_loss"].float()).cpu()
            s.token_mask = dist.all_gather_cat(signal["token_mask"].float()).cpu()
        if self.skip_step:        # the loop does not step; the scalar is an exact 0 with zero gradients
            self._weights = torch.zeros(len(losses), dtype=torch.float64)
            self._last_weights_digest = digest(self._weights)
            device = signal["loss"].device
            return {"sample_weights": self._mine(self._weights).to(device),
                    "denominator": torch.ones((), device=device)}
        self.engine.fire(Event.AFTER_LOSS)
        weights = compose_sample_weights(s, finite)
        token_weights = checked_token_weights(s)
        per_sample_tokens = token_weights.sum(-1) if token_weights is not None else tokens.double()
        total = (weights * per_sample_tokens).sum() if self.loss.reduction == "token" else weights.sum()
        if total <= 0:
            raise FloatingPointError(f"step {self.step}: the plugins' weights give every label token of the "
                                     "global batch weight 0, so there is nothing to train on")
        self._weights = weights * len(weights) / weights.sum() if weights.sum() > 0 else weights
        self._last_weights_digest = digest(self._weights, token_weights)
        device = signal["loss"].device
        answer = {"sample_weights": self._mine(weights).to(device),
                  "denominator": (total / self.world_size).to(device)}
        if token_weights is not None:
            answer["token_weights"] = self._mine(token_weights).to(device)
        return answer

    def _settle_losses(self, losses: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The global batch's per-sample losses into the state (non-finite ones per trainer.nonfinite);
        returns the finite mask."""
        s = self.state
        finite = torch.isfinite(losses)
        bad = ~finite | (labels > tokens)
        self.skip_step = False
        if bad.any() and self.nonfinite == "stop":
            raise FloatingPointError(
                f"step {self.step}: the training loss is NaN or infinite on samples "
                f"{s.batch_ids[bad].tolist()[:16]} ({int((labels - tokens).sum())} label tokens){lr_note(self.optimizer)}; "
                "trainer.nonfinite=drop trains on with weight 0 for them, skip drops the step")
        if bad.any() and self.nonfinite == "skip":
            self.skip_step = True
            self.skipped_steps += 1
            s.metrics["nonfinite/skipped_steps"] = self.skipped_steps
        if not finite.any() and not self.skip_step:
            raise FloatingPointError(
                f"step {self.step}: every per-sample loss of the global batch is NaN or infinite "
                f"(samples {s.batch_ids.tolist()[:16]}{' ...' if len(s.batch_ids) > 16 else ''}); "
                f"the model diverged or the data is broken{lr_note(self.optimizer)}: lower trainer.lr, check these "
                "samples with launch/where.py, or resume from an earlier checkpoint")
        s.loss_finite = finite
        stand_in = losses[finite].mean() if finite.any() else torch.tensor(0.0)
        s.losses = torch.where(finite, losses, stand_in)  # a stand-in inside [min, max]
        s.metrics["reweighter/nonfinite"] = int((labels - tokens).sum())
        s.metrics["reweighter/nonfinite_samples"] = int((~finite).sum())
        self._tokens, self._labels = tokens, labels
        return finite

    def check_ranks(self) -> None:
        """Compare the last step's decisions, its final weights included, across ranks now (one
        collective); called at every checkpoint and at the end of the run."""
        if self.world_size > 1 and self.state.batch_ids is not None:
            self._check_ranks_agree()

    def end_step(self) -> dict:
        """Let mixers learn from the step; return its metrics and ledger rows."""
        s = self.state
        if s.losses is None:
            if self._micro is not None and self._micro.rows:
                raise RuntimeError(f"end_step() after micro-batches of {self._micro.rows} of the local batch's "
                                   f"{len(self._micro.local_labels)} samples: every micro-batch of the step goes "
                                   "through flex.loss first")
            raise RuntimeError("end_step() before flex.loss(...): the step's per-sample losses are missing")
        if not self.skip_step:          # a skipped step teaches the mixers nothing
            self.engine.fire(Event.BATCH_END)
        ok = s.loss_finite
        if self.loss.reduction == "token":
            train_loss = float((s.losses * self._tokens)[ok].sum() / self._tokens[ok].sum().clamp(min=1))
        else:
            train_loss = float(s.losses[ok].mean())
        record = {"step": self.step, "train_loss": train_loss,
                  "domain_weights": dict(zip(s.domains, s.domain_weights.tolist()))}
        means, present = s.domain_mean(s.losses, s.batch_domains)
        record["domain_loss"] = {d: float(means[i]) for i, d in enumerate(s.domains) if present[i]}
        if s.keep_mask is not None:
            record["selected_fraction"] = float(s.keep_mask.float().mean())
        record.update(self._token_metrics())
        record.update(s.metrics)
        record["ledger"] = self._ledger_rows()
        if self.world_size > 1 and self.check_ranks_every and self.step % self.check_ranks_every == 0:
            self._check_ranks_agree()
        self.step += 1
        return record

    def _check_ranks_agree(self) -> None:
        check_ranks_agree(self.state, self._weights)

    def _token_metrics(self) -> dict:
        rows = self.global_batch_size if self.packing else len(self.state.batch_ids)
        metrics = token_metrics(self.state, self._labels, rows * self.data.seq_len)
        t = self._token_totals      # the run's achieved token shares and the expected ones, token-weighted
        t["tokens"] += metrics["tokens"]
        expected = self.sampler.token_shares().tolist()
        for d, name in enumerate(self.state.domains):
            t["domain"][d] += metrics["domain_tokens"][name]
            t["expected"][d] += metrics["tokens"] * expected[d]
        return metrics

    def token_shares(self) -> dict:
        """The run's share of label tokens per domain: `achieved` (trained) next to `target` (what the
        draws were set to give: each step's expected token share, weighted by the step's tokens; a mixer
        with unit=token gets its weights back), and the unit the mixer's weights were in at the end."""
        t, names = self._token_totals, self.state.domains
        n = max(t["tokens"], 1.0)
        return {"unit": self.state.weight_unit,
                "target": {d: t["expected"][i] / n for i, d in enumerate(names)},
                "achieved": {d: t["domain"][i] / n for i, d in enumerate(names)}}

    def _ledger_rows(self) -> dict:
        if self.packing:
            return packed_ledger_rows(self.state, self.step, self._weights, self._plan.rows,
                                      self.global_batch_size // self.world_size)
        return ledger_rows(self.state, self.step, self._weights, self.global_batch_size, self.world_size)

    def finish(self) -> dict:
        """FIT_END for the plugins; returns the files they export ({file name: JSON-able}), such as
        DoReMi's averaged mixture, for the run folder."""
        self.check_ranks()
        self.engine.fire(Event.FIT_END)
        files = {}
        for plugin in self.engine.plugins:
            exports = getattr(plugin, "exports", None)
            if exports is not None:
                files.update(exports(self.state))
        return files

    @torch.no_grad()
    def evaluate(self, val: MixtureDataset) -> dict:
        """Per-domain validation loss (mean over samples), then EVAL_END for the plugins."""
        losses = self.state.signals.probe(torch.arange(len(val)), dataset=val)
        means, present = per_domain_mean(losses, val.domain, len(val.names))
        result = {val.names[i]: float(means[i]) for i in range(len(val.names)) if present[i]}
        self.state.val_loss = {d: result[d] for d in self.state.domains if d in result}
        self.engine.fire(Event.EVAL_END)
        return result

    @torch.no_grad()
    def target_loss(self, limit: Optional[int] = None) -> dict:
        """Mean probe loss per part of the run's `target` dataset (the data config's `target`: one part named
        `target`, or its subtasks), over at most `limit` evenly spaced samples per part (the same ones at
        every evaluation and on every rank); {} without one. No plugin event: evaluate() is the evaluation."""
        target = self.datasets.get("target")
        if target is None:
            return {}
        part = torch.as_tensor(target.domain[torch.arange(len(target))])
        ids = torch.cat([evenly_spaced(torch.nonzero(part == i).flatten(), limit) for i in range(len(target.names))])
        losses = self.state.signals.probe(ids, dataset=target)
        means, present = per_domain_mean(losses, part[ids], len(target.names))
        return {target.names[i]: float(means[i]) for i in range(len(target.names)) if present[i]}

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.check_ranks()
        return {"step": self.step, "sampler": self.sampler.state_dict(), "engine": self.engine.state_dict(),
                "token_totals": {k: (list(v) if isinstance(v, list) else v) for k, v in self._token_totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.start()
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.engine.load_state_dict(state["engine"])
        if "token_totals" in state:
            self._token_totals = {k: (list(v) if isinstance(v, list) else v) for k, v in state["token_totals"].items()}
