"""dataflex inside TRL's `DPOTrainer`: TRL prepares, collates and scores the preference pairs, dataflex draws
and weighs them, one pair a sample.

    from dataflex.integrations.dpo import DataFlexDPOTrainer
    trainer = DataFlexDPOTrainer(model=model, processing_class=tokenizer,
                                 args=DPOConfig(output_dir=..., max_steps=100, max_length=512),
                                 train_dataset={"math": "math_pairs.jsonl", "chat": chat_ds},   # one domain each
                                 flex=dict(global_batch_size=16, plugins=[BanditMixer(), LossReweighter()]))
    trainer.train()

What TRL keeps (docs/integrations/huggingface-trainer.md, "TRL's DPOTrainer"):
- its data path: each domain (prompt/chosen/rejected records, conversational or not, explicit or implicit
  prompt; a `datasets.Dataset` or a JSONL file) goes through `DPOTrainer`'s own preparation (chat
  template, EOS, tokenization, dropping prompts that fill `max_length`) and each step's pairs through its
  collator (`max_length` truncation, `truncation_mode`, padding);
- its loss: `DPOTrainer.compute_loss` runs as it is (reference model or PEFT adapter, precomputed
  reference log-probs, `loss_type` / `loss_weights`, `beta`, label smoothing, WPO weighting, MoE auxiliary
  loss), and its metrics (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
  `logps/*`, `logits/*`, `entropy`, `mean_token_accuracy`, `num_tokens`) land in Trainer's logs;
- its trainer: evaluation on its own `eval_dataset`, model card, checkpoints (with dataflex's state:
  `DataFlexTrainerMixin`, so a resume continues exactly).

What dataflex changes: the pairs drawn each step (`DataFlexTrainerMixin`: sampler, mixers, exact resume,
gradient accumulation, ranks read at train start) and the batch mean. TRL computes one loss per pair
(`sum over loss_type of loss_weight x per-pair loss`) before it takes the batch mean; that per-pair loss is
dataflex's per-sample loss: mixers learn from each domain's mean pair loss, per-sample reweighters weigh the
pairs, and the step trains on `sum_i s_i l_i / sum_i s_i` (dataflex's `sample` reduction, the global sum
under data parallelism) instead of TRL's plain mean; whatever TRL adds that is not per pair (the MoE
auxiliary loss) is kept as it is. The ledger gets one row per pair: its weight and DPO loss.

Refused, with a message: selectors (they score candidates by probing the language-model loss of samples,
not a pair's DPO loss), token-level reweighters and mixers that need token losses (DPO's loss is one
margin per pair), `datasets=` for probing mixers (Aioli, Sheared), packing, and the `aot` / `aot_unpaired`
losses (they sort the batch's pairs, so no loss belongs to one pair). A pair is kept in memory as TRL
prepared it; its dataflex row (what probes would see, and the ledger's sample lengths) is the prompt and the
chosen completion.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from trl import DPOTrainer

from dataflex.data.mixture import MixtureDataset
from dataflex.data.records import read_jsonl
from dataflex.data.samples import SampleSet
from dataflex.integrations.hf_loop import DataFlexLoader, split_batch
from dataflex.integrations.hf_trainer import DataFlexTrainerMixin
from dataflex.integrations.sft import refuse_streaming
from dataflex.utils.errors import DataConfigError, UserError

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
ROW = "flex_row"          # each prepared record's index in its domain as given (TRL may drop records)
BATCH_COUPLED = {"aot", "aot_unpaired"}


class _PairWeight(float):
    """One of TRL's `loss_weights`, marked: TRL's `per_pair_loss.mean() * loss_weight` is found by it."""


class _PairLosses(TorchFunctionMode):
    """While DPOTrainer computes its loss: the per-pair loss tensor of each loss type, i.e. the tensor whose
    mean TRL multiplies by a (marked) loss weight. Reads, changes nothing."""

    def __init__(self):
        super().__init__()
        self.losses: list = []
        self._mean = None            # (input, output) of the last argument-free Tensor.mean

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.mean and len(args) == 1 and not kwargs:
            self._mean = (args[0], out)
        elif self._mean is not None and any(isinstance(a, _PairWeight) for a in args) \
                and any(a is self._mean[1] for a in args):
            self.losses.append(self._mean[0])
            self._mean = None
        return out


def read_pairs(source, name: str):
    """A domain's preference records: a `datasets.Dataset` as it is, or a JSONL file (one JSON record a line)."""
    import datasets

    refuse_streaming(f"train_dataset[{name!r}]", source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataConfigError(f"train_dataset[{name!r}]: no file {path}")
        source = datasets.Dataset.from_list([rec for _, rec in read_jsonl(str(path))])
    if not isinstance(source, datasets.Dataset):
        raise DataConfigError(f"train_dataset[{name!r}]: a datasets.Dataset or a JSONL path, "
                              f"got {type(source).__name__}")
    if len(source) == 0:
        raise DataConfigError(f"train_dataset[{name!r}]: empty")
    missing = {"chosen", "rejected"} - set(source.column_names)
    if missing:
        raise DataConfigError(f"train_dataset[{name!r}]: preference records need 'chosen' and 'rejected' (and "
                              f"'prompt', unless it is implicit in them); missing {sorted(missing)}")
    return source


def pair_samples(records: list, seq_len: int, pad_id: int, name: str, max_length: Optional[int] = None,
                 truncation_mode: str = "keep_start") -> SampleSet:
    """One dataflex sample per prepared pair: the prompt and the chosen completion, truncated as TRL's collator
    truncates it, inputs `ids[:-1]`, labels `ids[1:]`, the loss mask on the chosen completion's tokens."""
    n = len(records)
    inputs = torch.full((n, seq_len), int(pad_id), dtype=torch.long)
    labels, mask = inputs.clone(), torch.zeros(n, seq_len, dtype=torch.bool)
    cut = slice(None) if max_length is None else \
        (slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None))
    for i, rec in enumerate(records):
        ids = (list(rec["prompt_ids"]) + list(rec["chosen_ids"]))[cut]
        completion = ([0] * len(rec["prompt_ids"]) + [1] * len(rec["chosen_ids"]))[cut]
        m = min(len(ids) - 1, seq_len)
        if m <= 0:
            continue
        inputs[i, :m] = torch.tensor(ids[:m])
        labels[i, :m] = torch.tensor(ids[1:m + 1])
        mask[i, :m] = torch.tensor(completion[1:m + 1], dtype=torch.bool)
    return SampleSet(inputs, labels, mask, [f"{name}:{r[ROW]}" for r in records], [0] * n)


class PairLoader(DataFlexLoader):
    """DataFlexLoader whose micro-batches are TRL's collated pairs (chosen rows, then rejected rows) of the pairs
    dataflex drew, with their ids (`flex_ids`); `parts` holds the step's micro-batches."""

    def __init__(self, flex, steps: int, micro_batches: int, collate):
        super().__init__(flex, steps, micro_batches)
        self.collate = collate
        self.parts: list = []

    def __iter__(self):
        for _ in range(self.flex.step, self.steps):
            self.batch = self.flex.next_batch()
            ids = split_batch({"input_ids": self.batch["sample_id"]}, self.micro_batches)
            self.parts = [{**self.collate(p["input_ids"]), "flex_ids": p["input_ids"]} for p in ids]
            for j, part in enumerate(self.parts):
                yield {**part, "flex_micro": j}


class DataFlexDPOTrainer(DataFlexTrainerMixin, DPOTrainer):
    """TRL's `DPOTrainer` whose pairs come from a DataFlex session (see the module docstring)."""

    def __init__(self, *args, flex, train_dataset=None, **kwargs):
        import datasets

        from dataflex.session.flex import DataFlex

        if isinstance(flex, DataFlex) or not (isinstance(flex, dict) or callable(flex)):
            raise TypeError("DataFlexDPOTrainer: flex is a dict of DataFlex arguments or a function domains -> "
                            "DataFlex (the domains are the pairs TRL prepares from train_dataset), got "
                            f"{type(flex).__name__}")
        if isinstance(flex, dict) and flex.get("loss_reduction", "sample") != "sample":
            raise ValueError("DataFlexDPOTrainer: the loss is a (weighted) mean over pairs: loss_reduction='sample' "
                             f"(the default here), not {flex['loss_reduction']!r}")
        if isinstance(train_dataset, datasets.DatasetDict) or not isinstance(train_dataset, dict) or not train_dataset:
            raise DataConfigError("DataFlexDPOTrainer: train_dataset is a dict {domain: Dataset or JSONL path} of "
                                  "preference records, one domain each ({'train': ds} for one)")
        if isinstance(kwargs.get("eval_dataset"), MixtureDataset) or (
                isinstance(kwargs.get("eval_dataset"), dict)
                and any(isinstance(v, SampleSet) for v in kwargs["eval_dataset"].values())):
            raise DataConfigError("DataFlexDPOTrainer: eval_dataset is TRL's (preference records): dataflex's "
                                  "validation samples hold no pairs")
        config = kwargs.get("args")
        if set(getattr(config, "loss_type", None) or ()) & BATCH_COUPLED:
            raise ValueError(f"DataFlexDPOTrainer: loss_type {sorted(set(config.loss_type) & BATCH_COUPLED)} sorts the "
                             "batch's pairs, so no loss belongs to one pair for dataflex to weigh")
        self._flex_raw = {name: read_pairs(ds, name) for name, ds in train_dataset.items()}
        first = next(iter(self._flex_raw.values()))
        super().__init__(*args, flex=flex, train_dataset=first.select(range(1)), **kwargs)
        self.loss_weights = [_PairWeight(w) for w in self.loss_weights]

    # -- the domains: TRL's prepared pairs ------------------------------------------------------------------------
    def _flex_session(self, flex):
        from dataflex.session.flex import DataFlex

        self._flex_records, domains, names = [], {}, list(self._flex_raw)
        for name, ds in self._flex_raw.items():
            ds = ds.add_column(ROW, list(range(len(ds))))
            prepared = self._prepare_dataset(ds, self.processing_class, self.args, name)
            if len(prepared) == 0:
                raise DataConfigError(f"train_dataset[{name!r}]: no pair left after TRL's preparation (every prompt "
                                      f"fills max_length={self.args.max_length}?)")
            if self.precompute_ref_logps:
                prepared = self._precompute_ref_logps(prepared, name, self.args.precompute_ref_batch_size
                                                      or self.args.per_device_train_batch_size)
            keep = [c for c in (*PAIR_COLUMNS, ROW) if c in prepared.column_names]
            self._flex_records.append(prepared.select_columns(keep).to_list())
        self._flex_raw = None
        longest = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for recs in self._flex_records for r in recs)
        if self.args.max_length is not None:
            longest = min(longest, self.args.max_length)
        pad = self._tokenizer.pad_token_id
        for name, recs in zip(names, self._flex_records):
            domains[name] = pair_samples(recs, max(longest - 1, 1), pad, name, self.args.max_length,
                                         self.args.truncation_mode)
        flex = DataFlex(domains, **{"loss_reduction": "sample", **flex}) if isinstance(flex, dict) else flex(domains)
        self._flex_check(flex)
        return flex

    def _flex_check(self, flex) -> None:
        """What dataflex cannot do with one DPO loss per pair, refused before anything trains."""
        if flex.loss.reduction != "sample":
            raise ValueError("DataFlexDPOTrainer: the DataFlex session must use loss_reduction='sample' (a mean over "
                             f"pairs), not {flex.loss.reduction!r}")
        if flex.packing:
            raise ValueError("DataFlexDPOTrainer: packing is not available for preference pairs (TRL's collator pads "
                             "each step's pairs)")
        from dataflex.mixers import AioliMixer, ShearedMixer

        for p in flex.engine.plugins:
            if isinstance(p, (AioliMixer, ShearedMixer)):
                raise UserError(f"DataFlexDPOTrainer: {p.name} learns from validation probes, which score the "
                                "language-model loss of a pair's chosen text, not its DPO loss: use a mixer that "
                                "learns from the training step (BanditMixer, ADOMixer, StaticMixer)")
            if p.family == "selector":
                raise UserError(f"DataFlexDPOTrainer: {p.name} is a selector; selectors score candidates by probing "
                                "the language-model loss of samples, not a pair's DPO loss, and are not wired for DPO. "
                                "Use a mixer and/or a per-sample reweighter")
            if getattr(p, "needs_token_losses", False):
                raise UserError(f"DataFlexDPOTrainer: {p.name} weighs tokens, but DPO's loss is one margin per pair "
                                "(no per-token loss): use a per-sample reweighter (LossReweighter, TiltedReweighter)")
        if flex.datasets:
            raise UserError("DataFlexDPOTrainer: datasets= (for mixers that probe validation sets) is not wired for "
                            "DPO: a probe scores the language-model loss of a pair's chosen text, not its DPO loss")

    def _flex_collate(self, ids) -> dict:
        """TRL's collated batch of the pairs with these global ids."""
        domain, local = self.flex.data.locate(torch.as_tensor(ids).cpu())
        return self.data_collator([{k: v for k, v in self._flex_records[d][i].items() if k != ROW}
                                   for d, i in zip(domain.tolist(), local.tolist())])

    def get_train_dataloader(self):
        self._flex_loader = PairLoader(self.flex, self.args.max_steps, self._flex_micro_batches(), self._flex_collate)
        return self._flex_loader

    # -- the loss ------------------------------------------------------------------------------------------------
    def _flex_pair_losses(self, model, inputs) -> tuple:
        """(TRL's loss, the per-pair losses [pairs], their part of TRL's loss: sum over loss types of loss weight x
        the mean over pairs) of one collated batch, from one run of `DPOTrainer.compute_loss`."""
        reader = _PairLosses()
        with reader:
            loss = DPOTrainer.compute_loss(self, model, inputs)
        if len(reader.losses) != len(self.loss_types):
            raise RuntimeError(f"DataFlexDPOTrainer: read {len(reader.losses)} per-pair losses from TRL's DPO loss, "
                               f"expected one per loss_type {self.loss_types} (a TRL version this does not know?)")
        pairs = sum(w * x for w, x in zip(self.loss_weights, reader.losses))
        mean = sum(w * x.mean() for w, x in zip(self.loss_weights, reader.losses))
        return loss, pairs, mean

    @staticmethod
    def _flex_tokens(completion_mask: torch.Tensor) -> torch.Tensor:
        """Completion tokens of each pair of a collated batch (its chosen rows, then its rejected rows)."""
        tokens = completion_mask.sum(-1).float()
        n = len(tokens) // 2
        return tokens[:n] + tokens[n:]

    def _flex_weigh(self, pair_loss: torch.Tensor, tokens: torch.Tensor) -> dict:
        """Dataflex's answer for this rank's whole local batch of pairs: its signal is the pairs' losses and their
        completion tokens (chosen and rejected)."""
        signal = {"loss": pair_loss.detach().float(), "tokens": tokens, "labels": tokens}
        return self.flex.loss.weigh(signal, {})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        micro = inputs.pop("flex_micro", None)
        ids = inputs.pop("flex_ids", None)
        if ids is None or not model.training:        # TRL's evaluation, or a batch that is not dataflex's
            return DPOTrainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
        k = self.args.gradient_accumulation_steps
        if k > 1 and micro == 0:         # weigh the whole local batch once: its pairs' losses without gradients
            kept = ({m: list(v) for m, v in self._metrics["train"].items()}, self._total_train_tokens)
            losses, tokens = [], []
            with torch.no_grad():
                for part in self._flex_loader.parts:
                    part = self._prepare_inputs({k_: v for k_, v in part.items() if k_ != "flex_ids"})
                    losses.append(self._flex_pair_losses(model, part)[1])
                    tokens.append(self._flex_tokens(part["completion_mask"]))
            self._metrics["train"].clear()      # TRL's metrics come from the training forwards only
            self._metrics["train"].update(kept[0])
            self._total_train_tokens = kept[1]
            self._flex_answer = self._flex_weigh(torch.cat(losses), torch.cat(tokens))
        loss, pairs, mean = self._flex_pair_losses(model, inputs)
        if k == 1 or micro is None:
            self._flex_answer = self._flex_weigh(pairs, self._flex_tokens(inputs["completion_mask"]))
            weights = self._flex_answer["sample_weights"]
        else:
            m = len(pairs)
            weights = self._flex_answer["sample_weights"][micro * m:(micro + 1) * m]
        weights = weights.to(pairs)
        finite = torch.isfinite(pairs.detach())         # a non-finite pair has weight 0 and adds an exact 0
        weighted = (weights * torch.where(finite, pairs, torch.zeros_like(pairs))).sum()
        weighted = weighted / self._flex_answer["denominator"].to(pairs).clamp(min=torch.finfo(pairs.dtype).tiny)
        # TRL's loss with its plain mean over pairs replaced by dataflex's weighted one (what is not per pair stays)
        rest = loss - mean
        loss = torch.where(torch.isfinite(rest.detach()), rest, torch.zeros_like(rest)) / k + weighted
        loss = self._flex_share(loss, num_items_in_batch)
        return (loss, {}) if return_outputs else loss
