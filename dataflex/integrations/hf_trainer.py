"""dataflex inside Hugging Face's Trainer: mixers, selectors and reweighters without a new loop.

    from dataflex.integrations.hf_trainer import DataFlexTrainer
    flex = dataflex.DataFlex(domains.train, global_batch_size=16, plugins=[BanditMixer(), LossReweighter()])
    trainer = DataFlexTrainer(model=model, args=TrainingArguments(output_dir=..., max_steps=100), flex=flex)
    trainer.train()                        # RUN_DIR (args.output_dir) gets metrics.jsonl and ledger/

What changes against a plain Trainer, and nothing else:
- the train dataloader is `DataFlexLoader`: each optimizer step asks `flex.next_batch()` at the
  moment the step starts (current domain weights and keep masks; this rank's slice of the global
  batch, so Accelerate does not shard it again);
- `compute_loss` runs the model without `labels=` (dataflex.models.hf.hf_forward) and returns
  `flex.loss(logits, batch)` (with `lean_loss=True`, the default, from the hidden states and
  `lm_head` instead of the logits: dataflex.core.lean_loss), the plugins' weighted token mean with the global denominator (already
  averaged over ranks, not rescaled by Trainer);
- `DataFlexCallback.on_step_end` calls `flex.end_step()` (mixers learn) and writes the record:
  metrics.jsonl, ledger/, samples.parquet and summary.json under `run_dir` (default args.output_dir);
  Trainer's training logs get `dataflex/train_loss` and `dataflex/weight/<domain>`.

`DataFlexTrainerMixin` goes in front of any Trainer subclass (`class T(DataFlexTrainerMixin, SFTTrainer)`).
The global batch is `flex.global_batch_size` (per_device_train_batch_size is not used for training);
`gradient_accumulation_steps` must be 1 (one dataflex step per optimizer step); `max_steps` must be set.
Evaluation batches without `loss_mask` go through the Trainer's own compute_loss.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Optional

from transformers import Trainer, TrainerCallback

from dataflex.data.provenance import sample_table
from dataflex.grad.interface import TorchInterface
from dataflex.models.hf import forward_for
from dataflex.models.lean import lean_forward
from dataflex.run.outputs import RunOutputs
from dataflex.utils import dist


class DataFlexLoader:
    """What Trainer iterates: `steps` batches, each drawn by the sampler when the step asks for it."""

    def __init__(self, flex, steps: int):
        self.flex, self.steps = flex, int(steps)
        self.dataset = flex.data

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.flex.next_batch()


class DataFlexCallback(TrainerCallback):
    """Ends each dataflex step after the optimizer step and records it (rank 0 writes)."""

    def __init__(self, flex, run_dir: str, flush_every: int = 50, plot: bool = False):
        self.flex, self.run_dir, self.flush_every, self.plot = flex, run_dir, flush_every, plot
        self.out: Optional[RunOutputs] = None
        self.last: dict = {}
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.out = RunOutputs(self.run_dir, enabled=dist.rank() == 0, flush_every=self.flush_every)
        self.out.track_samples(self.flex.data.describe(), partial(sample_table, self.flex.data))
        self.started = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        record = self.flex.end_step()
        self.out.log(record)
        self.last = record

    def on_train_end(self, args, state, control, **kwargs):
        for name, content in self.flex.finish().items():
            if dist.rank() == 0:
                import json
                from pathlib import Path
                (Path(self.run_dir) / name).write_text(json.dumps(content, indent=2) + "\n")
        summary = {"strategy": {p.family: p.name for p in self.flex.engine.plugins},
                   "steps": self.flex.step, "wall_time_s": time.time() - self.started,
                   "domain_weights": self.out.last("domain_weights"), "world_size": self.flex.world_size,
                   "backend": "hf-trainer", "run_dir": str(self.run_dir)}
        self.out.finish(summary, plot=self.plot)


class DataFlexTrainerMixin:
    """Put in front of `transformers.Trainer` (or a subclass): `flex=` drives the data."""

    loss_is_scaled_for_ga = True        # flex.loss is the final scalar: Trainer must not rescale it

    def __init__(self, *args, flex, run_dir: Optional[str] = None, lean_loss: bool = True, **kwargs):
        self.flex = flex
        self.flex_lean_loss = lean_loss     # the loss from hidden states + lm_head, no logits (dataflex.core.lean_loss)
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("DataFlexTrainer: gradient_accumulation_steps must be 1 (one dataflex step per "
                             "optimizer step); raise DataFlex's global_batch_size instead")
        if self.args.max_steps is None or self.args.max_steps <= 0:
            raise ValueError("DataFlexTrainer: set TrainingArguments(max_steps=N); dataflex draws batches forever")
        if flex.interface is None:       # probes and gradients for selectors / reweighters that ask for them
            flex.interface = TorchInterface(self.model)
        self._flex_forward = forward_for(self.model)
        self.flex_callback = DataFlexCallback(flex, run_dir or self.args.output_dir)
        self.add_callback(self.flex_callback)

    def log(self, logs, *args, **kwargs):
        last = self.flex_callback.last
        if last and "loss" in logs:       # training logs: the step's dataflex loss and domain weights
            logs = {**logs, "dataflex/train_loss": last["train_loss"],
                    **{f"dataflex/weight/{d}": w for d, w in last["domain_weights"].items()}}
        return super().log(logs, *args, **kwargs)

    def get_train_dataloader(self):
        return DataFlexLoader(self.flex, self.args.max_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "loss_mask" not in inputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        logits = None
        if getattr(self, "flex_lean_loss", False) and not return_outputs:
            logits = lean_forward(self._flex_forward, model, inputs)     # None: the model cannot, logits below
        if logits is None:
            logits = self._flex_forward(model, inputs)
        loss = self.flex.loss(logits, inputs)
        return (loss, {"logits": logits}) if return_outputs else loss


class DataFlexTrainer(DataFlexTrainerMixin, Trainer):
    """`transformers.Trainer` whose data comes from a DataFlex session (see the module docstring)."""


def make_flex_trainer(trainer_cls=Trainer):
    """`DataFlexTrainerMixin` in front of any Trainer class (TRL's SFTTrainer, your own subclass)."""
    return type(f"DataFlex{trainer_cls.__name__}", (DataFlexTrainerMixin, trainer_cls), {})
