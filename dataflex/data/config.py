"""A data config read and checked: paths resolved, inputs expanded by dataprep's readers, documents read
strictly (a malformed record names its file and line), the (domain, split) groups listed with config errors
first; `data_config_for` gives an HF model its own tokenizer."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

from dataflex.utils.errors import DataConfigError
from dataprep.readers import InputError, Source, expand_entry, read_source
from dataprep.safety import check_name
from dataprep.tokenizer import (
    DEFAULT_TOKENIZER,
    REPO_ROOT,
    _read_json,
    has_tokenizer,
    load_tokenizer,
)


def resolve(path) -> str:
    """A relative path is taken from the working directory, else from the dataflex checkout
    (so the embedded corpus is found wherever a run starts)."""
    p = Path(str(path))
    if p.is_absolute() or _exists(p) or not _exists(REPO_ROOT / p):
        return str(p)
    return str(REPO_ROOT / p)


def _exists(p: Path) -> bool:
    return p.exists() or bool(glob.glob(str(p)))


MALFORMED = {"bad_json": "malformed JSON", "bad_utf8": "not valid UTF-8", "not_an_object": "record is not a JSON object",
             "missing_text": "record has no string 'text' field", "non_string_text": "record has no string 'text' field"}


def expand_paths(spec, key: str) -> list[Source]:
    """A config entry (a path, folder, glob or a list of them) as input sources, dataprep's readers'."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    try:
        return [src for s in specs for src in expand_entry(resolve(s), key)]
    except InputError as e:
        raise DataConfigError(str(e)) from None


def read_documents(src: Source, key: str = "data", column: str = "text",
                   split: str | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) pairs; doc_id is `path:line` (`path:row` for Parquet and datasets). Training is
    strict where dataprep is forgiving: a malformed record stops the run, naming file and line. `column`:
    the text field (JSONL, Parquet, datasets); `split`: a saved `DatasetDict`'s split."""
    try:
        records = read_source(src, column, split=split)      # a binary file is refused here, by its content
    except InputError as e:
        raise DataConfigError(f"{e} ({key})") from None
    records = iter(records)
    while True:
        try:                            # a reader that checks lazily (a dataset's column) raises here
            record = next(records)
        except StopIteration:
            return
        except InputError as e:
            raise DataConfigError(f"{e} ({key})") from None
        if record.reason == "empty_text":
            continue
        if record.reason:
            why = MALFORMED.get(record.reason, record.reason).replace("'text'", repr(column))
            raise DataConfigError(f"{src.path}:{record.line}: {why} ({key})")
        yield f"{src.path}:{record.line}", record.text


def check_names(data) -> None:
    """Domain and target-subtask names are names (they become folder names in the data cache): refused,
    naming the key, before any file is read or written. A manifest's own domain names are its writer's."""
    domains = data.get("domains")
    if hasattr(domains, "items"):
        for name in domains:
            check_name(name, f"data.domains.{name}", DataConfigError)
    target = data.get("target")
    if hasattr(target, "items") and "val" not in target:
        for name in target:
            check_name(name, f"data.target.{name}", DataConfigError)


def _groups(data: dict) -> list[dict]:
    """Every (domain, split) of a raw-file data config with its expanded inputs; config errors first."""
    check_names(data)
    groups = []
    for name, entry in data["domains"].items():
        entry = dict(entry) if not isinstance(entry, str) else {"train": entry}
        bad = sorted(set(entry) - {"train", "val", "kind", "column", "split", "records"})
        if bad:
            raise DataConfigError(f"data.domains.{name}: unknown key(s) {bad}; expected train, val, kind, column, "
                                  "split and records")
        if "train" not in entry:
            raise DataConfigError(f"data.domains.{name}.train: missing")
        for split in ("train", "val"):
            if entry.get(split):
                key = f"data.domains.{name}.{split}"
                group = {"name": name, "split": split, "key": key, "spec": entry[split],
                         "sources": [(s.path, s.fmt) for s in expand_paths(entry[split], key)]}
                group.update(_read_options(entry, split, key))
                groups.append(group)
    seen = {}      # the same file in two domains would train on it twice, under two names
    for g in groups:
        for path, _ in g["sources"]:
            real = os.path.realpath(path)
            other = seen.setdefault(real, g)
            if other["name"] != g["name"]:
                raise DataConfigError(f"{path}: in two domains ({other['key']} and {g['key']}); a file belongs to "
                                      "one domain")
    return groups + _target_groups(data)


def _read_options(entry: dict, split: str, key: str) -> dict:
    """A domain's `records:` (text, prompt-completion or chat: dataflex.data.records), `column:` (the text
    field, default `text`; the messages field for chat records) and `split:` (a saved DatasetDict's split for
    train, or {train: NAME, val: NAME}; default the split named like the config key: `train`, and
    `validation` for val). Only what differs from the defaults is kept (it is part of the cache key)."""
    from dataflex.data.records import check_records

    out = {}
    records = check_records(entry.get("records"), f"{key.rsplit('.', 1)[0]}.records")
    if records != "text":
        out["records"] = records
    column = entry.get("column")
    if column is not None:
        if not isinstance(column, str) or not column:
            raise DataConfigError(f"{key.rsplit('.', 1)[0]}.column: a column name, got {column!r}")
        if column != "text":
            out["column"] = column
    names = entry.get("split")
    if names is not None and not isinstance(names, str):
        names = dict(names)
        bad = sorted(set(names) - {"train", "val"})
        if bad:
            raise DataConfigError(f"{key.rsplit('.', 1)[0]}.split: unknown key(s) {bad}; expected train and val")
        names = names.get(split)
    elif split == "val":
        names = None
    if names:
        out["hf_split"] = str(names)
    return out


def hf_split(group: dict) -> str:
    """The DatasetDict split a group reads (a plain dataset or a file ignores it)."""
    return group.get("hf_split") or ("train" if group["split"] == "train" else "validation")


def _target_groups(data: dict) -> list[dict]:
    """The target set's groups: `_target` for `target: {val: PATH}`, `_target.NAME` for each subtask."""
    check_names({"target": data.get("target")})
    target = dict(data.get("target") or {})
    subtasks = {"": target} if "val" in target else {str(k): dict(v) for k, v in target.items()}
    groups = []
    for name, entry in subtasks.items():
        key = f"data.target.{name + '.' if name else ''}val"
        if "val" not in entry:
            raise DataConfigError(f"{key}: missing (target: {{val: PATH}} or target: {{SUBTASK: {{val: PATH}}}})")
        groups.append({"name": f"_target.{name}" if name else "_target", "split": "val", "key": key,
                       "spec": entry["val"], "sources": [(s.path, s.fmt) for s in expand_paths(entry["val"], key)]})
    return groups


def is_hf_model_config(model_cfg) -> bool:
    target = str((model_cfg or {}).get("_target_", ""))
    return target.endswith("hf.build_model") or target.startswith("dataflex.models.hf.")


def data_config_for(data_cfg, model_cfg):
    """The data config a model trains on. For `model=hf`: `model.tokenizer` if set; else the data
    config's own tokenizer unless it is the embedded demo tokenizer (2048 tokens: wrong data for any
    pretrained model); else the model directory's tokenizer. Other models: the data config as is."""
    if not is_hf_model_config(model_cfg):
        return data_cfg
    from omegaconf import OmegaConf


    data = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else dict(data_cfg)
    own = model_cfg.get("tokenizer")
    named = data.get("tokenizer")
    embedded = named is not None and Path(resolve(named)).resolve() == Path(resolve(DEFAULT_TOKENIZER)).resolve()
    if own:
        data["tokenizer"] = str(own)
        if Path(resolve(str(own))).resolve() == Path(resolve(DEFAULT_TOKENIZER)).resolve():
            _refuse_embedded(model_cfg)
    elif named is None or embedded:
        if not has_tokenizer(model_cfg.get("path")):
            raise FileNotFoundError(f"model.path {model_cfg.get('path')} has no tokenizer (tokenizer.json or "
                                    "tokenizer.model); name the model's tokenizer with model.tokenizer=PATH "
                                    "(the embedded demo tokenizer never trains an HF model)")
        data["tokenizer"] = str(model_cfg.get("path"))
    return data


def _refuse_embedded(model_cfg) -> None:
    """The embedded demo tokenizer only fits a model made for it (a random-init model with its
    vocabulary); a pretrained model's vocabulary differs, and its data would be silently wrong."""
    n = _read_json(Path(str(model_cfg.get("path"))) / "config.json").get("vocab_size")
    ours = load_tokenizer(resolve(DEFAULT_TOKENIZER)).vocab_size
    if n is not None and int(n) != ours:
        raise ValueError(f"model.tokenizer is the embedded demo tokenizer ({ours} tokens), but the model at "
                         f"{model_cfg.get('path')} has a {n}-token vocabulary: a pretrained model trains with its "
                         "own tokenizer (leave model.tokenizer unset)")
