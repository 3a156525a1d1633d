"""dataflex inside TRL's `SFTTrainer`: TRL prepares the data, dataflex draws, weighs and records it.

    from dataflex.integrations.sft import DataFlexSFTTrainer
    trainer = DataFlexSFTTrainer(model=model, processing_class=tokenizer,
                                 args=SFTConfig(output_dir=..., max_steps=100, max_length=512),
                                 train_dataset={"math": math_ds, "chat": chat_ds},     # one domain each
                                 flex=dict(global_batch_size=16, plugins=[BanditMixer()], seed=0))
    trainer.train()

What TRL keeps (docs/integrations/huggingface-trainer.md, "TRL's SFTTrainer"):
- its data path: each domain's `datasets.Dataset` goes through `SFTTrainer`'s own preparation (chat
  template, `messages` / `prompt`+`completion` / text records, `assistant_only_loss`,
  `completion_only_loss`, `max_length` truncation, `formatting_func`), and the tokens TRL would train on
  (labels other than -100) are the samples' loss mask: prompt tokens carry weight 0 in dataflex's loss,
  its per-sample signals and the ledger's token counts;
- its metrics: `entropy`, `mean_token_accuracy` and `num_tokens` in Trainer's logs, from the same forward
  (over the label tokens dataflex trains on);
- its trainer: callbacks, model card, checkpoints (with dataflex's state: `DataFlexTrainerMixin`).

What dataflex changes: the batches (`DataFlexTrainerMixin`: sampler, plugins, exact resume, gradient
accumulation, ranks read at train start), and the loss: dataflex's weighted token mean. Samples are one
prepared record each, right-padded to the longest prepared sequence (at most `max_length`), held in
memory. TRL's packing (`packing=True`) and padding-free batches are refused: pack with dataflex's own
packing, `flex=dict(..., packing=True)`, which keeps per-sample losses exact.

`flex=` is a DataFlex (its domains already built: `train_dataset` stays out), a dict of DataFlex
arguments, or a function `domains -> DataFlex`; the last two get `{domain: SampleSet}` made from
`train_dataset`. `eval_dataset` may be a dict `{domain: Dataset}` (prepared by TRL the same way) or
dataflex's validation sets: `evaluate()` is then `flex.evaluate` (`eval_<domain>_loss`).
"""
from __future__ import annotations

from typing import Optional

import torch
from trl import SFTTrainer

from dataflex.core.lean_loss import LeanOutput, head_params
from dataflex.data.mixture import MixtureDataset
from dataflex.data.samples import SampleSet
from dataflex.integrations.hf_trainer import DataFlexTrainerMixin
from dataflex.utils.errors import DataConfigError

IGNORE = -100


def _is_dataset(x) -> bool:
    import datasets

    return isinstance(x, (datasets.Dataset, datasets.IterableDataset))


def refuse_streaming(name: str, data) -> None:
    import datasets

    if isinstance(data, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataConfigError(f"{name}: a streaming dataset (IterableDataset) cannot be a dataflex domain: dataflex "
                              "draws samples by id. Load it with `load_dataset(..., streaming=False)`, or save it "
                              "first (`Dataset.from_generator(lambda: iter(ds))` then `save_to_disk`)")


def longest(prepared: list) -> int:
    """Tokens of the longest prepared record over every dataset of `prepared` (TRL-prepared `Dataset`s)."""
    return max((max((len(x) for x in ds["input_ids"]), default=0) for ds in prepared), default=0)


def sft_samples(records, seq_len: int, pad_id: int, name: str = "sft") -> SampleSet:
    """A `SampleSet` of records TRL prepared (`input_ids`, `labels` with -100 where TRL trains on nothing):
    one sample per record, inputs `ids[:-1]`, labels `ids[1:]`, the loss mask where TRL's (unshifted) label
    is not -100, right-padded to `seq_len` labels (a record longer than `seq_len + 1` tokens is refused)."""
    n = len(records)
    inputs = torch.full((n, seq_len), int(pad_id), dtype=torch.long)
    labels, mask = inputs.clone(), torch.zeros(n, seq_len, dtype=torch.bool)
    for i, rec in enumerate(records):
        ids = list(rec["input_ids"])
        trl_labels = list(rec["labels"]) if "labels" in rec else ids
        m = len(ids) - 1
        if m > seq_len:
            raise DataConfigError(f"{name}: record {i} holds {len(ids)} tokens, more than seq_len + 1 = {seq_len + 1}")
        if m <= 0:
            continue
        inputs[i, :m] = torch.tensor(ids[:-1])
        labels[i, :m] = torch.tensor(ids[1:])
        mask[i, :m] = torch.tensor([t != IGNORE for t in trl_labels[1:]])
    return SampleSet(inputs, labels, mask, [f"{name}:{i}" for i in range(n)], [0] * n)


class DataFlexSFTTrainer(DataFlexTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` whose batches come from a DataFlex session (see the module docstring)."""

    def __init__(self, *args, flex, train_dataset=None, **kwargs):
        import datasets

        from dataflex.session.flex import DataFlex

        sft_args = kwargs.get("args")
        if getattr(sft_args, "packing", False) or getattr(sft_args, "padding_free", False):
            raise ValueError("DataFlexSFTTrainer: TRL's packing / padding_free cannot keep one sample per row; "
                             "leave them off and pack with dataflex: flex=dict(..., packing=True)")
        self._flex_raw: Optional[dict] = None
        if isinstance(train_dataset, datasets.DatasetDict):
            raise DataConfigError(f"DataFlexSFTTrainer: train_dataset is a DatasetDict (splits {list(train_dataset)}): "
                                  "give {domain: dataset}, e.g. {'chat': dd['train']}")
        if isinstance(train_dataset, dict):
            if isinstance(flex, DataFlex):
                raise ValueError("DataFlexSFTTrainer: train_dataset={domain: Dataset} builds the domains; give "
                                 "flex=dict(global_batch_size=..., plugins=...) (or a function domains -> DataFlex), "
                                 "not a DataFlex that already has its own")
            if not train_dataset:
                raise DataConfigError("DataFlexSFTTrainer: train_dataset holds no domain")
            for name, ds in train_dataset.items():
                refuse_streaming(f"train_dataset[{name!r}]", ds)
                if not _is_dataset(ds):
                    raise DataConfigError(f"train_dataset[{name!r}]: a datasets.Dataset, got {type(ds).__name__}")
                if len(ds) == 0:
                    raise DataConfigError(f"train_dataset[{name!r}]: empty")
            self._flex_raw = dict(train_dataset)
            first = next(iter(train_dataset.values()))
            train_dataset = first.select(range(1))     # TRL reads the records' format from it
        elif train_dataset is None:
            if not isinstance(flex, DataFlex):
                raise ValueError("DataFlexSFTTrainer: give train_dataset={domain: Dataset} (TRL prepares each one) "
                                 "or flex=DataFlex(domains, ...)")
            train_dataset = datasets.Dataset.from_dict({"input_ids": [[0, 0]]})     # TRL wants one; never drawn
        else:
            refuse_streaming("train_dataset", train_dataset)
            raise DataConfigError("DataFlexSFTTrainer: train_dataset is a dict {domain: Dataset} (one domain each; "
                                  "{'train': ds} for one)")
        if not (isinstance(flex, (DataFlex, dict)) or callable(flex)):
            raise TypeError(f"flex: a DataFlex, a dict of DataFlex arguments or a function domains -> DataFlex, "
                            f"got {type(flex).__name__}")
        super().__init__(*args, flex=flex, train_dataset=train_dataset, **kwargs)

    def _prepare_dataset(self, dataset, *args, **kwargs):
        if isinstance(dataset, MixtureDataset):       # dataflex's validation sets: already samples
            return dataset
        refuse_streaming("dataset", dataset)
        return super()._prepare_dataset(dataset, *args, **kwargs)

    def _flex_session(self, flex):
        from dataflex.session.flex import DataFlex

        eval_raw = self.eval_dataset if isinstance(self.eval_dataset, dict) and self.eval_dataset \
            and all(_is_dataset(d) for d in self.eval_dataset.values()) else None
        if self._flex_raw is None and eval_raw is None:
            return flex
        prepared = {name: self._prepare_dataset(ds, self.processing_class, self.args, False, self._formatting_func,
                                                name) for name, ds in (self._flex_raw or {}).items()}
        T = self._flex_seq_len(flex, list(prepared.values()) + list((eval_raw or {}).values()))
        pad = self._tokenizer.pad_token_id
        if eval_raw is not None:         # TRL prepared them in __init__
            self.eval_dataset = MixtureDataset({d: sft_samples(ds, T, pad, f"eval:{d}") for d, ds in eval_raw.items()})
        if self._flex_raw is None:
            return flex
        for name, ds in prepared.items():
            if len(ds) == 0:
                raise DataConfigError(f"train_dataset[{name!r}]: no record left after TRL's preparation (every one "
                                      "fully masked at max_length?)")
        domains = {name: sft_samples(ds, T, pad, name) for name, ds in prepared.items()}
        self._flex_raw = None
        return DataFlex(domains, **flex) if isinstance(flex, dict) else flex(domains)

    def _flex_seq_len(self, flex, prepared: list) -> int:
        """Labels a sample holds: the longest prepared record less one (TRL truncated it to max_length); a
        prebuilt DataFlex's own seq_len when it is given."""
        seq = getattr(flex, "data", None)
        if seq is not None:
            return seq.seq_len
        return max(longest(prepared) - 1, 1)

    # -- TRL's metrics -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _flex_observe(self, model, inputs: dict, outputs) -> None:
        """TRL's `entropy`, `mean_token_accuracy` (over the label tokens dataflex trains on) and `num_tokens`
        (input tokens, padding excluded) from this forward's outputs; the logits of label tokens only, in
        chunks, from a LeanOutput's hidden states and head."""
        mode = "train" if model.training else "eval"
        mask = inputs["loss_mask"].bool()
        labels = inputs["labels"][mask]
        if isinstance(outputs, LeanOutput):
            weight, bias = head_params(outputs.head)
            rows = outputs.hidden[mask]
        else:
            rows = getattr(outputs, "logits", outputs)[mask]
            weight = bias = None
        entropy = torch.zeros((), device=labels.device)
        correct = torch.zeros((), device=labels.device)
        for start in range(0, len(rows), 1024):
            part = rows[start:start + 1024]
            logits = part @ weight.T if weight is not None else part
            if bias is not None:
                logits = logits + bias
            logp = logits.float().log_softmax(-1)
            entropy = entropy + -(logp.exp() * logp).sum()
            correct = correct + (logp.argmax(-1) == labels[start:start + 1024]).sum()
        gather = self.accelerator.gather_for_metrics
        valid = gather(mask.sum().reshape(1)).sum()
        entropy, correct = gather(entropy.reshape(1)).sum(), gather(correct.reshape(1)).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if "segment_ids" in inputs:        # a packed row: its filled slots
                tokens = (inputs["segment_ids"] >= 0).sum()
            else:                              # a sample's record: up to its last label, plus that label's token
                T = mask.shape[-1]
                last = torch.where(mask, torch.arange(1, T + 1, device=mask.device), 0).amax(-1)
                tokens = (last + (last > 0)).sum()
            self._total_train_tokens += int(gather(tokens.reshape(1)).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
