"""`datasets` as domains: a `Dataset` object (text or tokenized), a `DatasetDict` folder with `split:` and a
`column:` key in a data config, prompt/completion records with the loss on completions only; each against the
same text through JSONL files (the data config's own path) or against the tokenizer directly."""
from __future__ import annotations

import json

import datasets
import pytest
import torch

from dataflex.data.config import DEFAULT_TOKENIZER, resolve
from dataflex.data.domains import dataset_domain, load_domains
from dataflex.utils.errors import DataConfigError
from dataprep.tokenizer import load_tokenizer

SEQ = 16
TEXTS = {"A": [f"the {i}th cat sat on the mat and looked at {i} birds, then slept." for i in range(12)],
         "B": [f"Step {i}: add {i} to {2 * i} and the sum is {3 * i}; check it twice." for i in range(10)]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve(DEFAULT_TOKENIZER))


@pytest.fixture(scope="module")
def from_files(tmp_path_factory):
    """The same texts through the data config's JSONL path (the token cache): the reference samples."""
    root = tmp_path_factory.mktemp("files")
    for d, texts in TEXTS.items():
        (root / f"{d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = {"domains": {d: {"train": str(root / f"{d}.jsonl")} for d in TEXTS}, "cache": str(root / "cache")}
    return load_domains(cfg, SEQ).train


def same_rows(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a.rows(torch.arange(len(a))), b.rows(torch.arange(len(b)))):
        assert torch.equal(torch.as_tensor(x).long(), torch.as_tensor(y).long())


def test_dataset_objects_give_the_samples_of_the_same_text_in_files(tokenizer, from_files):
    for d, texts in TEXTS.items():
        same_rows(dataset_domain(datasets.Dataset.from_dict({"text": texts}), SEQ, tokenizer), from_files[d])
        # a text column not named `text`
        same_rows(dataset_domain(datasets.Dataset.from_dict({"body": texts, "id": list(range(len(texts)))}), SEQ,
                                 tokenizer, column="body"), from_files[d])
        # tokenized (input_ids used as they are: no tokenizer needed)
        ids = [tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
        tokenized = dataset_domain(datasets.Dataset.from_dict({"input_ids": ids}), SEQ)
        assert torch.equal(tokenized.input_ids, dataset_domain(datasets.Dataset.from_dict({"text": texts}), SEQ,
                                                               tokenizer).input_ids)
    with pytest.raises(DataConfigError, match="no column 'text'"):
        dataset_domain(datasets.Dataset.from_dict({"body": TEXTS["A"]}), SEQ, tokenizer)
    with pytest.raises(DataConfigError, match="streaming"):
        dataset_domain(datasets.Dataset.from_dict({"text": TEXTS["A"]}).to_iterable_dataset(), SEQ, tokenizer)


def test_datasetdict_folder_with_column_and_split_keys_in_a_data_config(tmp_path, tokenizer, from_files):
    for d, texts in TEXTS.items():
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts}),
                              "validation": datasets.Dataset.from_dict({"content": texts[:3]}),
                              "other": datasets.Dataset.from_dict({"content": texts[:1]})}
                             ).save_to_disk(str(tmp_path / d))
    cfg = {"domains": {d: {"train": str(tmp_path / d), "val": str(tmp_path / d), "column": "content"}
                       for d in TEXTS}, "cache": str(tmp_path / "cache")}
    domains = load_domains(cfg, SEQ)
    for d in TEXTS:
        same_rows(domains.train[d], from_files[d])
        assert 0 < len(domains.val[d]) < len(domains.train[d])
    cfg["domains"]["A"]["split"] = {"train": "other"}          # another split of the DatasetDict
    assert len(load_domains(cfg, SEQ).train["A"]) < len(domains.train["A"])
    cfg["domains"]["A"]["column"] = "nope"
    with pytest.raises(DataConfigError, match="nope"):
        load_domains(cfg, SEQ)


def test_prompt_completion_records_train_on_completions_only(tokenizer):
    records = {"prompt": ["Q: two plus two?", "Q: capital of France?"], "completion": [" A: four.", " A: Paris."]}
    s = dataset_domain(datasets.Dataset.from_dict(records), 32, tokenizer)
    for i, (p, c) in enumerate(zip(records["prompt"], records["completion"])):
        prompt, completion = tokenizer.encode(p), tokenizer.encode(c) + [tokenizer.eos_id]
        n = len(prompt) + len(completion) - 1
        assert s.input_ids[i, :n].tolist() == (prompt + completion)[:-1]
        assert s.labels[i][s.loss_mask[i]].tolist() == completion          # the loss sees the completion only
        assert int(s.loss_mask[i].sum()) == len(completion) and not s.loss_mask[i, n:].any()
