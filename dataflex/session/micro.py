"""A step's micro-batches: Megatron's schedule (or a loop with gradient accumulation) calls `flex.loss` once per
micro-batch, in order, each on the next rows of the local batch (packed: the next rows with the samples they
hold, `dataflex.core.packing.slice_rows`; micro-batches then differ in samples, and in samples per rank)."""
from __future__ import annotations

import torch

from dataflex.core.events import Event
from dataflex.session.rank_check import digest
from dataflex.session.weighting import compose_sample_weights
from dataflex.utils import dist


class MicroBatches:
    """The micro-batches of one step seen so far, and the weights known before any loss."""

    def __init__(self, local_labels: torch.Tensor, local_rows: int | None = None):
        self.local_labels = local_labels        # label tokens of every sample of this rank's local batch
        self.local_rows = len(local_labels) if local_rows is None else int(local_rows)    # its rows (packed)
        self.parts: list = []
        self.rows = 0
        self.weights = None
        self.total = None

    def splits(self, n: int) -> bool:
        """True once the step is fed in micro-batches (a first call with fewer rows than the local batch)."""
        return self.weights is not None or n < len(self.local_labels)

    def weigh(self, flex, signal: dict, batch: dict) -> dict:
        """One micro-batch of the step (Megatron's schedule calls the loss_func once per micro-batch, in
        order, each on the next rows of the local batch; every data-parallel rank runs as many).

        Its per-sample signals are gathered over the ranks and kept; when the local batch is complete
        they form the step's global losses, as one call with the whole batch would (end_step, the mixers
        and the ledger see all of them). A micro-batch's backward runs before the next one's forward, so
        its weights cannot depend on later losses: the weights known before any loss (the mixer's
        domain loss weights, `apply=loss`) apply, the denominator is the global batch's weighted label
        tokens (gathered once, at the first micro-batch) over the number of micro-batches (the scalar is
        averaged over micro-batches, as Megatron's schedule and `loss / accumulation_steps` do), and plugins that weigh by the step's losses
        (AFTER_LOSS: reweighters) are refused here: `backend=megatron` weighs the whole batch forward-only
        first, and so can a loop of your own (`flex.loss.from_token_loss` on the whole local batch)."""

        s = flex.state
        device = signal["loss"].device
        if self.weights is None:
            weighing = [p.name for p in flex.engine.plugins if Event.AFTER_LOSS in getattr(p, "events", ())]
            if weighing:
                raise RuntimeError(
                    f"{', '.join(weighing)} weigh(s) samples by the step's losses, which needs the whole local batch "
                    f"({len(self.local_labels)} samples) before the first backward; flex.loss got a micro-batch of "
                    f"{len(signal['loss'])}. Use one micro-batch per step, backend=megatron (it weighs the batch "
                    "forward-only first), or call flex.loss.from_token_loss once on the whole local batch's "
                    "per-token losses")
            labels_all = dist.all_gather_cat(self.local_labels.float().to(device)).cpu().double()
            weights = compose_sample_weights(s, torch.ones(len(labels_all), dtype=torch.bool))
            total = (weights * labels_all).sum() if flex.loss.reduction == "token" else weights.sum()
            if total <= 0:
                raise FloatingPointError(f"step {flex.step}: the global batch has no label token to train on")
            self.weights, self.total = weights, total
        n, offset = len(signal["loss"]), self.rows
        if offset + n > len(self.local_labels):
            raise RuntimeError(f"flex.loss got {offset + n} samples in micro-batches this step, the local batch "
                               f"has {len(self.local_labels)}: call flex.next_batch() once per step")
        label_tokens = (signal["labels"].to(device).float() if "labels" in signal          # packed: per sample
                        else batch["loss_mask"].to(device, non_blocking=True).sum(-1).float())
        rank = torch.full((n,), float(dist.rank()), device=device)
        local = torch.stack([signal["loss"].float(), signal["tokens"].float(), label_tokens, rank], 1)
        self.parts.append(dist.all_gather_cat(local).cpu())      # [samples of every rank, 4]
        self.rows += n
        weights = flex._mine(self.weights)[offset:offset + n].to(device)
        weights = weights * torch.isfinite(signal["loss"]).to(weights.dtype)
        # the micro-batch's scalar is its share of the global loss times the number of micro-batches: the schedule
        # (Megatron's, or a loop's `loss / accumulation_steps`) averages over micro-batches
        scale = self.local_rows / len(batch["loss_mask"])
        answer = {"sample_weights": weights, "denominator": (self.total / (flex.world_size * scale)).to(device)}
        if self.rows == len(self.local_labels):        # the step's last micro-batch: the whole batch's signals
            parts = torch.cat(self.parts)
            order = torch.sort(parts[:, 3], stable=True).indices    # rank-major: the global batch's order
            gathered = parts[order, :3]
            finite = flex._settle_losses(gathered[:, 0], gathered[:, 1], gathered[:, 2])
            w = self.weights * finite.double()
            flex._weights = w * len(w) / w.sum() if w.sum() > 0 else w
            flex._last_weights_digest = digest(flex._weights)
        return answer
