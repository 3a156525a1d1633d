"""dataflex inside Hugging Face's Trainer: mixers, selectors and reweighters without a new loop.

    from dataflex.integrations.hf_trainer import DataFlexTrainer
    flex = dataflex.DataFlex(domains.train, global_batch_size=16, plugins=[BanditMixer(), LossReweighter()])
    trainer = DataFlexTrainer(model=model, args=TrainingArguments(output_dir=..., max_steps=100), flex=flex,
                              eval_dataset=domains.val)      # optional: dataflex's validation sets
    trainer.train()                        # RUN_DIR (args.output_dir) gets metrics.jsonl and ledger/

What changes against a plain Trainer, and nothing else (docs/integrations/huggingface-trainer.md):
- the train dataloader is `DataFlexLoader`: each optimizer step asks `flex.next_batch()` at the
  moment the step starts (current domain weights and keep masks; this rank's slice of the global
  batch, so Accelerate does not shard it again), split into `gradient_accumulation_steps`
  micro-batches of `per_device_train_batch_size`;
- the global batch is DataFlex's `global_batch_size`, which must equal `per_device_train_batch_size
  x gradient_accumulation_steps x world size`; a `per_device_train_batch_size` left at Trainer's default
  follows dataflex's, any other value that disagrees is refused;
- rank and world size are read when training (or an evaluation) starts, not when DataFlex is built,
  so DataFlex may be created before `TrainingArguments` under torchrun;
- `compute_loss` runs the model without `labels=` (dataflex.models.hf.hf_forward) and returns
  `flex.loss(logits, batch)` (with `lean_loss=True`, the default, from the hidden states and
  `lm_head` instead of the logits: dataflex.core.lean_loss), the plugins' weighted token mean with
  the global denominator (already averaged over ranks, not rescaled by Trainer). With k > 1
  micro-batches the plugins weigh the whole batch once, from a no-gradient forward of its
  micro-batches at the step's first one, and each micro-batch returns its share of the one-batch loss
  (the accumulated gradient is the one-batch gradient; the extra forward costs about a third of a step);
- `DataFlexCallback.on_step_end` calls `flex.end_step()` (mixers learn) and writes the record:
  metrics.jsonl, ledger/, samples.parquet and summary.json under `run_dir` (default args.output_dir);
  Trainer's training logs (and so W&B, TensorBoard, every `report_to`) get `dataflex/train_loss`,
  `dataflex/weight/<domain>`, `dataflex/loss/<domain>` and the plugins' statistics (`dataflex/<name>`);
- every Trainer checkpoint holds `dataflex_state.pt` (sampler, plugins, step: a weights-only file);
  `train(resume_from_checkpoint=...)` restores it, so the run continues exactly where it stopped
  (with or without `ignore_data_skip`: dataflex's position is its own state, never skipped batches),
  and the run folder's records after the checkpoint are dropped;
- `eval_dataset` may be dataflex's validation sets (a `MixtureDataset` or `{domain: SampleSet}`, such as
  `domains.val`): `evaluate()` is `flex.evaluate` (per-domain mean sample loss, `eval_<domain>_loss`,
  `eval_loss` their mean over domains) and fires EVAL_END, so mixers that learn at evaluations do.
  Any other eval dataset goes through Trainer's own evaluation; a batch there that carries dataflex's
  `loss_mask` is scored with dataflex's labels (already shifted) and mask;
- under `TrainingArguments(deepspeed=...)` (ZeRO 0-3) the plugins' signals go through the engine's
  interface (`dataflex.backends.deepspeed.DeepSpeedInterface`: ghost norms and dots under ZeRO-3), and
  DeepSpeed's batch sizes are dataflex's ("auto" follows it, a contradicting number is refused);
- transformers 4 and 5: the Trainer hooks that changed between them (resume's batch skipping, the loss's
  division by the micro-batch count) are handled on both.

`DataFlexTrainerMixin` goes in front of any Trainer subclass; TRL's SFTTrainer has its own class that keeps
TRL's data preparation and metrics: `dataflex.integrations.sft.DataFlexSFTTrainer`.
`max_steps` must be set.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dataflex.core.lean_loss import LeanOutput
from dataflex.core.loss import loss_grad_hint, per_token_loss, reduce_loss
from dataflex.grad.interface import TorchInterface
from dataflex.grad.params import frozen_message
from dataflex.integrations.hf_loop import (STATE_FILE, DataFlexCallback, DataFlexLoader, as_eval_set,  # noqa: F401
                                           log_entries, resolve_ranks, split_batch)
from dataflex.models.hf import forward_for
from dataflex.models.lean import lean_forward
from dataflex.utils.errors import UserError

_DEFAULT_PER_DEVICE = TrainingArguments.__dataclass_fields__["per_device_train_batch_size"].default


class DataFlexTrainerMixin:
    """Put in front of `transformers.Trainer` (or a subclass): `flex=` drives the data."""

    loss_is_scaled_for_ga = True        # flex.loss is the final scalar: Trainer must not rescale it

    def __init__(self, *args, flex, run_dir: Optional[str] = None, lean_loss: bool = True, **kwargs):
        self.flex = flex
        self.flex_lean_loss = lean_loss     # the loss from hidden states + lm_head, no logits (dataflex.core.lean_loss)
        if as_eval_set(kwargs.get("eval_dataset")) is not None:
            kwargs["eval_dataset"] = as_eval_set(kwargs["eval_dataset"])
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module) and not any(p.requires_grad for p in model.parameters()):
            raise UserError(f"{type(self).__name__}: {frozen_message(model)}")      # a reloaded adapter
        super().__init__(*args, **kwargs)
        self.flex = flex = self._flex_session(flex)
        if self.args.max_steps is None or self.args.max_steps <= 0:
            raise ValueError("DataFlexTrainer: set TrainingArguments(max_steps=N); dataflex draws batches forever")
        self._flex_forward = forward_for(self.model)
        self._flex_own_interface = flex.interface is None
        if flex.interface is None:       # probes and gradients for selectors / reweighters that ask for them
            flex.interface = TorchInterface(self.model)
        self._flex_loader: Optional[DataFlexLoader] = None
        self._flex_answer: dict = {}
        self.flex_callback = DataFlexCallback(flex, run_dir or self.args.output_dir, on_begin=self._flex_bind_engine)
        self.add_callback(self.flex_callback)

    def _flex_bind_engine(self) -> None:
        """Under Trainer's DeepSpeed (`TrainingArguments(deepspeed=...)`), once Trainer has built the engine: the
        signals dataflex's plugins ask for (losses, probes, ghost norms and dots, factored features) go through
        the engine's interface (`dataflex.backends.deepspeed.DeepSpeedInterface`), whose forward gathers ZeRO-3's
        partitioned parameters, instead of the raw module (empty placeholders under ZeRO-3). An interface the
        user gave DataFlex is left as it is."""
        engine = self.model_wrapped
        if not (self._flex_own_interface and getattr(self, "is_deepspeed_enabled", False)
                and callable(getattr(engine, "zero_optimization_stage", None))):
            return
        from dataflex.backends.extensions import release_shm_buffer
        release_shm_buffer()                # Trainer's init_distributed: its CPU comm buffer leaves nothing behind
        if getattr(self.flex.interface, "engine", None) is not engine:
            from dataflex.backends.deepspeed import DeepSpeedInterface

            self.flex.interface = DeepSpeedInterface(engine, self._flex_forward)

    def _flex_session(self, flex):
        """The DataFlex session, once the Trainer is built (a subclass may build it from the Trainer's data)."""
        return flex

    def _flex_observe(self, model, inputs: dict, outputs) -> None:
        """Called with each forward's outputs (logits or a LeanOutput) on a batch in dataflex's layout: a
        subclass adds its own metrics here (DataFlexSFTTrainer: TRL's)."""

    # -- the batch: ranks, sizes, micro-batches ------------------------------------------------------------------
    def _flex_micro_batches(self) -> int:
        """Micro-batches per step; checks dataflex's global batch against Trainer's batch arguments."""
        resolve_ranks(self.flex)
        k, world, B = self.args.gradient_accumulation_steps, self.flex.world_size, self.flex.global_batch_size
        if B % (k * world):
            raise ValueError(f"DataFlexTrainer: DataFlex's global batch {B} does not split into "
                             f"gradient_accumulation_steps={k} x {world} ranks")
        micro = B // (k * world)
        per_device = self.args.per_device_train_batch_size
        if per_device != micro and per_device != _DEFAULT_PER_DEVICE:
            raise ValueError(f"DataFlexTrainer: per_device_train_batch_size={per_device} x gradient_accumulation_steps="
                             f"{k} x {world} ranks = {per_device * k * world}, but DataFlex's global batch is {B}: "
                             f"set per_device_train_batch_size={micro} (or leave it out: it follows DataFlex's)")
        self._train_batch_size = micro          # Trainer's samples/s and logs count the batch dataflex draws
        self._flex_deepspeed_batch(micro, k, B)
        return k

    def _flex_deepspeed_batch(self, micro: int, k: int, B: int) -> None:
        """Under `TrainingArguments(deepspeed=...)`, before Trainer builds the engine: DeepSpeed's batch sizes are
        dataflex's. A number the user's DeepSpeed config gives that contradicts them is refused; values Trainer
        filled in for "auto" from a `per_device_train_batch_size` left at its default follow dataflex's."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if getattr(self, "is_deepspeed_enabled",
                                                                                        False) else None
        if plugin is None:
            return
        user = self.args.deepspeed
        if isinstance(user, (str, os.PathLike)):
            user = json.loads(Path(user).read_text())
        want = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": k, "train_batch_size": B}
        for key, value in want.items():
            given = user.get(key) if isinstance(user, dict) else None
            if given not in (None, "auto") and given != value:
                raise ValueError(f"DataFlexTrainer: the DeepSpeed config's {key}={given} contradicts dataflex's "
                                 f"{value} (global batch {B} = {micro} per device x {k} micro-batches x "
                                 f"{B // (micro * k)} ranks): set it to \"auto\" or {value}")
        hf_config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
        configs = {id(c): c for c in (getattr(plugin, "deepspeed_config", None), hf_config) if isinstance(c, dict)}
        for cfg in configs.values():
            cfg.update(want)

    def get_train_dataloader(self):
        self._flex_loader = DataFlexLoader(self.flex, self.args.max_steps, self._flex_micro_batches())
        return self._flex_loader

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        return dataloader           # the loader starts at flex.step: a restored session skips nothing

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _inner_training_loop(self, *args, **kwargs):
        checkpoint = kwargs.get("resume_from_checkpoint")
        if checkpoint is not None:
            self._flex_load(checkpoint)
        if checkpoint is None or hasattr(Trainer, "get_resumed_dataloader"):
            return super()._inner_training_loop(*args, **kwargs)
        # transformers 4 has no get_resumed_dataloader: it skips a resumed epoch's first batches itself, with
        # accelerate's skip_first_batches (which needs a torch DataLoader). dataflex's position is its own
        # state, so nothing is skipped: Trainer runs as with ignore_data_skip for this call
        skip = self.args.ignore_data_skip
        self.args.ignore_data_skip = True
        try:
            return super()._inner_training_loop(*args, **kwargs)
        finally:
            self.args.ignore_data_skip = skip

    def _flex_load(self, checkpoint) -> None:
        from dataflex.utils.safeload import load_weights_only

        path = Path(checkpoint) / STATE_FILE
        if not path.is_file():
            raise UserError(f"resume_from_checkpoint={checkpoint}: no {STATE_FILE} in it (not written by "
                            "DataFlexTrainer?): dataflex cannot continue its sampler and plugins from there")
        resolve_ranks(self.flex)
        saved = load_weights_only(path, "resume_from_checkpoint: dataflex state")
        self.flex.load_state_dict(saved["flex"])

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = self.flex.state_dict()               # every rank: it compares the ranks' decisions
        if self.flex_callback.out is not None:
            self.flex_callback.out.flush()           # the ledger up to the checkpoint is on disk
        if self.args.should_save:                    # before Trainer's files: a folder with trainer_state.json has it
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (STATE_FILE + ".tmp")
            torch.save({"format": 1, "global_step": self.state.global_step, "flex": state}, tmp)
            os.replace(tmp, folder / STATE_FILE)
        return super()._save_checkpoint(model, trial)

    # -- the loss ------------------------------------------------------------------------------------------------
    def _flex_outputs(self, model, inputs, lean: bool):
        out = lean_forward(self._flex_forward, model, inputs) if lean else None   # None: the model cannot
        return self._flex_forward(model, inputs) if out is None else out

    def _flex_share(self, loss, num_items_in_batch):
        """The loss handed back to Trainer's training step, which must not rescale it: transformers 5 reads
        `loss_is_scaled_for_ga` (True above); transformers 4 divides by the step's micro-batch count unless the
        model takes loss kwargs (and the count of label tokens was made) or a `compute_loss_func` is set, so
        there the loss is multiplied by that count first."""
        if hasattr(Trainer, "loss_is_scaled_for_ga"):
            return loss
        divides = (not self.model_accepts_loss_kwargs or num_items_in_batch is None) and self.compute_loss_func is None
        return loss * self.current_gradient_accumulation_steps if divides else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        micro = inputs.pop("flex_micro", None)
        if "loss_mask" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        lean = getattr(self, "flex_lean_loss", False) and not return_outputs
        if not model.training:       # an evaluation batch in dataflex's layout: its labels and mask, no plugin
            logits = self._flex_outputs(model, inputs, lean)
            loss = reduce_loss(per_token_loss(logits, inputs["labels"]), inputs["loss_mask"])
            self._flex_observe(model, inputs, logits)
            return (loss, {"logits": logits}) if return_outputs else loss
        k = self.args.gradient_accumulation_steps
        if k == 1 or micro is None:
            logits = self._flex_outputs(model, inputs, lean)
            loss = self._flex_share(self.flex.loss(logits, inputs), num_items_in_batch)
            self._flex_observe(model, inputs, logits)
            return (loss, {"logits": logits}) if return_outputs else loss
        if micro == 0:               # weigh the whole batch once, from its micro-batches' losses
            whole = self._prepare_inputs(self._flex_loader.batch)
            with torch.no_grad():
                token_loss = torch.cat([per_token_loss(self._flex_outputs(model, part, True), part["labels"])
                                        for part in split_batch(whole, k)])
            self._flex_answer = self.flex.loss.weigh_token_loss(token_loss, whole)
        answer, m = self._flex_answer, len(inputs["input_ids"])
        part = slice(micro * m, (micro + 1) * m)
        sample_weights, token_weights = answer.get("sample_weights"), answer.get("token_weights")
        sample_weights = None if sample_weights is None else sample_weights[part]
        token_weights = None if token_weights is None else token_weights[part]
        logits = self._flex_outputs(model, inputs, lean)
        # the weights are known before this micro-batch's forward: the lean path forms its gradients there
        hint = loss_grad_hint(inputs["loss_mask"], sample_weights, token_weights, self.flex.loss.reduction) \
            if isinstance(logits, LeanOutput) else None
        loss = reduce_loss(per_token_loss(logits, inputs["labels"], grad_hint=hint), inputs["loss_mask"],
                           sample_weights, token_weights, self.flex.loss.reduction, answer.get("denominator"))
        loss = self._flex_share(loss, num_items_in_batch)
        self._flex_observe(model, inputs, logits)
        return (loss, {"logits": logits}) if return_outputs else loss

    # -- evaluation and logs -------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(data, str) and isinstance(self.eval_dataset, dict):
            data = self.eval_dataset[data]
        val = as_eval_set(data)
        if val is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        resolve_ranks(self.flex)
        self._flex_bind_engine()
        start = time.time()
        losses = self.flex.evaluate(val)           # per-domain mean sample loss; EVAL_END for the plugins
        metrics = {f"{metric_key_prefix}_{d}_loss": v for d, v in losses.items()}
        metrics[f"{metric_key_prefix}_loss"] = sum(losses.values()) / max(len(losses), 1)
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs, *args, **kwargs):
        last = self.flex_callback.last
        if last and "loss" in logs:       # training logs: the last step's dataflex record
            logs = {**logs, **log_entries(last)}
        return super().log(logs, *args, **kwargs)


class DataFlexTrainer(DataFlexTrainerMixin, Trainer):
    """`transformers.Trainer` whose data comes from a DataFlex session (see the module docstring)."""


def make_flex_trainer(trainer_cls=Trainer):
    """`DataFlexTrainerMixin` in front of any Trainer class (TRL's SFTTrainer, your own subclass)."""
    return type(f"DataFlex{trainer_cls.__name__}", (DataFlexTrainerMixin, trainer_cls), {})
