"""Megatron-LM's `pretrain_gpt.py` way in (docs/integrations/megatron-lm.md): its 3-tuple `loss_func`, its
batch keys, and a per-iteration hook, with dataflex deciding the data.

    flex = DataFlex(domains.train, global_batch_size=args.global_batch_size, plugins=[BanditMixer()],
                    rank=ps.get_data_parallel_rank(), world_size=ps.get_data_parallel_world_size())
    dataflex.utils.dist.use_group(ps.get_data_parallel_group())
    data = MegatronLMData(flex, args.micro_batch_size, on_step=write_ledger)    # the train data iterator
    forward_step = megatron_lm_forward_step(flex)                                # pretrain(..., forward_step)

- `megatron_lm_loss_func(flex)` is a `loss_func(loss_mask, output_tensor, model=None)` with pretrain_gpt.py's
  signature and answer: `(loss, num_tokens, {"lm loss": [masked token-loss sum, num_tokens]})`. The loss is
  dataflex's weighted scalar, scaled so that Megatron's schedule (which divides a 3-tuple's loss by
  `num_tokens` and by the number of micro-batches) trains on exactly dataflex's loss; the reported
  "lm loss" is Megatron-LM's own, unweighted.
- `MegatronLMData(flex, micro_batch_size)` is the train data iterator: each iteration's local batch from
  `flex.next_batch()`, cut into micro-batches with Megatron-LM's keys (`tokens`, `labels`, `loss_mask`,
  `attention_mask` None: causal, `position_ids`). The step boundary is its per-iteration hook: when the
  next iteration asks for its first micro-batch (after the optimizer step), it calls `flex.end_step()`
  (mixers learn) and hands the record (metrics and ledger rows) to `on_step`; `finish()` closes the last.
- `megatron_lm_forward_step(flex)` is pretrain_gpt.py's forward_step with that loss_func; it reads the
  iterator on every rank (each rank's DataFlex draws the same global batch from the shared seed and
  takes its data-parallel slice), where pretrain_gpt.py's `get_batch` reads it on tensor-parallel rank 0.

Packed rows (`DataFlex(packing=True)`) take Megatron-LM's own packed convention (`--reset-position-ids
--reset-attention-mask`): position ids restart at every sample and `attention_mask` is the block-diagonal causal
mask ([b, 1, s, s] bool, True = masked out), so attention never crosses samples; micro-batches are row ranges with
the samples they hold, and each carries `segments` (its segment ids, positions and sample ids) that the forward
step hands to the loss_func (`segments=`), so per-sample losses are per sample, not per row.

Pipeline parallelism is not supported here (only the last stage runs a loss_func, so the other stages'
DataFlex would not see the step's losses): `backend=megatron` broadcasts them. Megatron-LM's
`--calculate-per-token-loss` is refused (its scaling by the global token count is not dataflex's).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from dataflex.backends.megatron.model import megatron_mask
from dataflex.core.packing import slice_rows

MEGATRON_LM_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def megatron_lm_batch(batch: dict) -> dict:
    """A dataflex batch with Megatron-LM's keys (attention_mask None: the model's causal mask); a packed one
    with the block-diagonal mask and `segments` (module docstring)."""
    out = {"tokens": batch["input_ids"], "labels": batch["labels"], "loss_mask": batch["loss_mask"],
           "attention_mask": megatron_mask(batch), "position_ids": batch["position_ids"]}
    if "segment_ids" in batch:
        out["segments"] = {k: batch[k] for k in ("segment_ids", "position_ids", "sample_id", "domain", "row")
                           if k in batch}
    return out


def _per_token_loss_mode(model) -> bool:
    for m in (model, getattr(model, "module", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None:
            return bool(getattr(cfg, "calculate_per_token_loss", False))
    return False


def megatron_lm_loss_func(flex, report_key: str = "lm loss") -> Callable:
    """pretrain_gpt.py's `loss_func(loss_mask, output_tensor, model=None)` through dataflex (module docstring)."""

    def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, model=None, segments: Optional[dict] = None):
        if _per_token_loss_mode(model):
            raise NotImplementedError("dataflex's loss_func with --calculate-per-token-loss: Megatron-LM would divide "
                                      "by the global token count, dataflex weighs by its own denominator; leave it off")
        token_loss = output_tensor.float().view(loss_mask.shape)
        loss = flex.loss.from_token_loss(token_loss, {"loss_mask": loss_mask, **(segments or {})})
        num_tokens = loss_mask.sum().clone().detach().to(torch.int)
        plain = (token_loss.detach() * loss_mask.float()).sum()
        reporting = torch.cat([plain.view(1), num_tokens.view(1).to(plain)])
        # the schedule divides a 3-tuple's loss by num_tokens (clamped to 1) and by the number of micro-batches;
        # dataflex's micro-batch scalar is already averaged over micro-batches: undo the first division only
        return loss * num_tokens.clamp(min=1), num_tokens, {report_key: reporting}

    return loss_func


class MegatronLMData:
    """Megatron-LM's train data iterator from a DataFlex session, with the per-iteration hook (module docstring)."""

    def __init__(self, flex, micro_batch_size: int, on_step: Optional[Callable[[dict], None]] = None,
                 device: Optional[torch.device] = None):
        self.flex, self.micro_batch_size, self.on_step, self.device = flex, int(micro_batch_size), on_step, device
        self._queue: list = []
        self._open = False         # a step was drawn and not yet ended
        self.records: list = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self.end_step()
            batch = self.flex.next_batch()
            n = len(batch["input_ids"])
            if n % self.micro_batch_size:
                raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide the local batch {n} "
                                 "(global batch / data-parallel size)")
            if self.device is not None:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            m = self.micro_batch_size
            self._queue = [megatron_lm_batch(slice_rows(batch, i, i + m)) for i in range(0, n, m)]
            self._open = True
        return self._queue.pop(0)

    def end_step(self) -> Optional[dict]:
        """End the drawn step (flex.end_step, then `on_step(record)`); a no-op when none is open."""
        if not self._open:
            return None
        if self._queue:
            raise RuntimeError(f"{len(self._queue)} micro-batch(es) of the step were never read: Megatron-LM's "
                               "num_microbatches must be the local batch / micro_batch_size")
        self._open = False
        record = self.flex.end_step()
        if self.on_step is not None:
            self.on_step(record)
        return record

    def finish(self) -> Optional[dict]:
        """After the last iteration: end its step."""
        return self.end_step()


def megatron_lm_forward_step(flex, loss_func: Optional[Callable] = None) -> Callable:
    """pretrain_gpt.py's `forward_step(data_iterator, model)` with dataflex's loss_func (module docstring)."""
    loss_func = loss_func or megatron_lm_loss_func(flex)

    def forward_step(data_iterator, model, return_schedule_plan: bool = False):
        from megatron.core import parallel_state as ps
        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("dataflex in pretrain_gpt.py needs pipeline_model_parallel_size=1 (only the last "
                                      "stage sees the losses); backend=megatron supports pipeline stages")
        batch = next(data_iterator)
        output_tensor = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        packed = {"segments": batch["segments"]} if "segments" in batch else {}    # packed rows: per sample
        return output_tensor, partial(loss_func, batch["loss_mask"], model=model, **packed)

    return forward_step
