"""What Trainer's loop sees of dataflex (`dataflex.integrations.hf_trainer`): the loader that draws each step's
batch when the step asks for it and cuts it into micro-batches, the callback that ends and records each step, the
step record as Trainer log entries, and the process group read when training starts."""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from dataflex.data.mixture import MixtureDataset
from dataflex.data.provenance import sample_table
from dataflex.run.outputs import RunOutputs, flatten_for_wandb, truncate_run
from dataflex.utils import dist
from dataflex.utils.errors import UserError

STATE_FILE = "dataflex_state.pt"      # in every Trainer checkpoint folder


def split_batch(batch: dict, parts: int) -> list:
    """`parts` micro-batches of a batch dict: every tensor whose first dimension is the batch's is cut in
    `parts` equal consecutive slices; anything else is shared."""
    if parts == 1:
        return [batch]
    B = len(batch["input_ids"])
    if B % parts:
        raise ValueError(f"a batch of {B} samples does not split into {parts} micro-batches")
    m = B // parts
    return [{k: v[j * m:(j + 1) * m] if torch.is_tensor(v) and v.dim() and len(v) == B else v
             for k, v in batch.items()} for j in range(parts)]


def resolve_ranks(flex) -> None:
    """Bind a DataFlex session to the process group as it is now: under torchrun the group exists only once
    `TrainingArguments` (Accelerate) has made it, which may be after DataFlex was built."""
    rank, world = dist.rank(), dist.world_size()
    if (flex.rank, flex.world_size) == (rank, world):
        return
    if getattr(flex, "_started", False) or flex.world_size != 1:
        raise RuntimeError(f"DataFlex was set up for rank {flex.rank} of {flex.world_size}, this process is rank "
                           f"{rank} of {world}: build DataFlex without rank=/world_size= (they are read when "
                           "training starts) or with this job's values")
    if flex.global_batch_size % world:
        raise ValueError(f"global batch size {flex.global_batch_size} must divide by the {world} ranks")
    flex.rank, flex.world_size = rank, world
    flex.sampler.rank, flex.sampler.world_size = rank, world
    flex.state.world_size = world


def as_eval_set(data):
    """dataflex's validation sets as one MixtureDataset (a MixtureDataset, or {domain: SampleSet} such as
    `domains.val`); None for anything else (a Trainer dataset)."""
    if isinstance(data, MixtureDataset):
        return data
    if isinstance(data, dict) and data and all(hasattr(v, "rows") and hasattr(v, "seq_len") for v in data.values()):
        return MixtureDataset(data)
    return None


class DataFlexLoader:
    """What Trainer iterates: for each remaining step, the batch `flex.next_batch()` draws when the step asks
    for it, as `micro_batches` micro-batches. `len()` is the whole run (Trainer's epoch arithmetic);
    iteration starts at `flex.step` (a resumed session continues: nothing is drawn to be skipped)."""

    def __init__(self, flex, steps: int, micro_batches: int = 1):
        self.flex, self.steps, self.micro_batches = flex, int(steps), int(micro_batches)
        self.dataset = flex.data
        self.batch: Optional[dict] = None       # the current step's whole (this rank's) batch

    def __len__(self) -> int:
        return self.steps * self.micro_batches

    def __iter__(self):
        for _ in range(self.flex.step, self.steps):
            self.batch = self.flex.next_batch()
            for j, part in enumerate(split_batch(self.batch, self.micro_batches)):
                yield {**part, "flex_micro": j}


class DataFlexCallback(TrainerCallback):
    """Ends each dataflex step after the optimizer step and records it (rank 0 writes)."""

    def __init__(self, flex, run_dir: str, flush_every: int = 50, plot: bool = False, on_begin=None):
        self.flex, self.run_dir, self.flush_every, self.plot = flex, run_dir, flush_every, plot
        self.on_begin = on_begin        # called first at train begin, once Trainer has wrapped the model
        self.out: Optional[RunOutputs] = None
        self.last: dict = {}
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.on_begin is not None:
            self.on_begin()
        if self.flex.step != state.global_step:
            raise UserError(f"DataFlexTrainer: dataflex is at step {self.flex.step}, Trainer at step "
                            f"{state.global_step}: resume from a checkpoint DataFlexTrainer wrote (it holds {STATE_FILE})")
        if self.flex.step and dist.rank() == 0:      # a resume: drop what the folder recorded after the checkpoint
            truncate_run(Path(self.run_dir), self.flex.step)
        dist.barrier()
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
                (Path(self.run_dir) / name).write_text(json.dumps(content, indent=2) + "\n")
        summary = {"strategy": {p.family: p.name for p in self.flex.engine.plugins},
                   "steps": self.flex.step, "wall_time_s": time.time() - self.started,
                   "domain_weights": self.out.last("domain_weights"), "world_size": self.flex.world_size,
                   "backend": "hf-trainer", "run_dir": str(self.run_dir)}
        self.out.finish(summary, plot=self.plot)


def log_entries(record: dict) -> dict:
    """A step record as flat Trainer log entries: `dataflex/train_loss`, `dataflex/weight/<domain>`,
    `dataflex/loss/<domain>` and every plugin statistic as `dataflex/<name>`."""
    flat = flatten_for_wandb({k: v for k, v in record.items() if k != "ledger"})
    out = {}
    for k, v in flat.items():
        k = k.replace("domain_weights/", "weight/", 1) if k.startswith("domain_weights/") else k
        k = k.replace("domain_loss/", "loss/", 1) if k.startswith("domain_loss/") else k
        out[f"dataflex/{k}"] = v
    return out
