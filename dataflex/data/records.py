"""Supervised records in a data config: the loss on the completion (or the assistant's turns) only.

A domain's `records:` key says what its records hold (default `text`: documents, every token trained):

- `prompt-completion`: `prompt` and `completion` fields. Strings: prompt tokens then completion tokens then
  end-of-text, the completion and end-of-text trained. Lists of messages (`{"role", "content"}`): rendered
  with the tokenizer's chat template, prompt with the generation prompt, the completion's tokens trained.
- `chat`: a list of messages in `messages` (or the field `column:` names). With a chat template that marks
  the assistant's text (`{% generation %}`), every assistant turn is trained; otherwise the last message must
  be the assistant's and it alone is trained (the tokens past the rendered prompt with its generation prompt).

Chat templates come from the data config's tokenizer folder (`tokenizer_config.json` / `chat_template.jinja`,
read by transformers' `AutoTokenizer`, offline); a tokenizers JSON file has none and is refused for messages.
The token ids are the training tokenizer's (the same files). Records are read from JSONL (also .gz/.zst),
Parquet and saved `datasets` folders (`split:`), strictly: a malformed record names its file and line.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Optional

from dataflex.utils.errors import DataConfigError

RECORDS = ("text", "prompt-completion", "chat")


def check_records(value, key: str) -> str:
    kind = "text" if value is None else str(value)
    if kind not in RECORDS:
        raise DataConfigError(f"{key}: records: {value!r}; expected one of {list(RECORDS)}")
    return kind


def fields(kind: str, column: Optional[str]) -> tuple:
    return ("prompt", "completion") if kind == "prompt-completion" else (column or "messages",)


def read_records(src, key: str, kind: str, column: Optional[str] = None,
                 split: Optional[str] = None) -> Iterator[tuple[str, dict]]:
    """(doc_id, record) of a JSONL / Parquet / saved-dataset input; doc_id is `path:line` (`path:row`)."""
    from dataprep.readers import InputError, check_not_binary

    need = fields(kind, column)
    try:
        if src.fmt == "jsonl":
            check_not_binary(src.path)
            rows = read_jsonl(src.path)
        elif src.fmt == "parquet":
            rows = _parquet(src.path, need)
        elif src.fmt == "hf":
            rows = _hf(src.path, need, split)
        else:
            raise DataConfigError(f"{src.path}: records: {kind} reads JSONL, Parquet or a saved dataset folder, "
                                  f"not {src.fmt} ({key})")
        for line, rec in rows:
            if not isinstance(rec, dict):
                raise DataConfigError(f"{src.path}:{line}: record is not a JSON object ({key})")
            missing = [f for f in need if rec.get(f) is None]
            if missing:
                raise DataConfigError(f"{src.path}:{line}: record has no {' / '.join(map(repr, missing))} field "
                                      f"(records: {kind}; {key})")
            yield f"{src.path}:{line}", rec
    except InputError as e:
        raise DataConfigError(f"{e} ({key})") from None


def read_jsonl(path: str):
    """(line number, record) of each non-empty line of a JSONL file (compressed too); `PATH:LINE: malformed JSON`."""
    import orjson

    from dataprep.readers import _open_binary

    with _open_binary(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, orjson.loads(line)
            except ValueError:
                raise DataConfigError(f"{path}:{i}: malformed JSON") from None


def _parquet(path: str, need: tuple):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    missing = [f for f in need if f not in pf.schema_arrow.names]
    if missing:
        raise DataConfigError(f"{path}: Parquet file has no column {missing[0]!r}; columns: {pf.schema_arrow.names}")
    row = 0
    for b in pf.iter_batches(batch_size=1024, columns=list(need)):
        for rec in b.to_pylist():
            yield row, rec
            row += 1


def _hf(path: str, need: tuple, split: Optional[str]):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataConfigError(f"{path}: the DatasetDict has splits {list(ds)}, none named {split!r} (split:)")
        ds = ds[split]
    missing = [f for f in need if f not in ds.column_names]
    if missing:
        raise DataConfigError(f"{path}: dataset has no column {missing[0]!r}; columns: {ds.column_names}")
    for row, rec in enumerate(ds.select_columns(list(need))):
        yield row, rec


def chat_tokenizer(tokenizer, key: str):
    """transformers' tokenizer of the training tokenizer's folder, with its chat template."""
    folder = getattr(tokenizer, "folder", None)
    if folder is None:
        raise DataConfigError(f"{key}: messages are rendered with a chat template, and data.tokenizer "
                              f"({tokenizer.path}) is a tokenizers file without one: name the model's tokenizer "
                              "folder (data.tokenizer=PATH, or model.path for model=hf)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise DataConfigError(f"{key}: the tokenizer at {folder} has no chat template (tokenizer_config.json's "
                              "chat_template or chat_template.jinja): messages need one")
    return tok


def template_sha(tokenizer, kind: str, key: str) -> Optional[str]:
    """The chat template's sha256 where records may need one (part of the data cache's key)."""
    if kind == "text" or getattr(tokenizer, "folder", None) is None:
        return None
    try:
        tok = chat_tokenizer(tokenizer, key)
    except DataConfigError:
        return None
    return hashlib.sha256(str(tok.chat_template).encode()).hexdigest()


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RecordTokenizer:
    """A record as (token ids, trained): `trained[i]` says whether token i is a label the loss sees."""

    def __init__(self, tokenizer, kind: str, key: str, column: Optional[str] = None):
        self.tokenizer, self.kind, self.key, self.column = tokenizer, kind, key, column
        self._chat = None

    @property
    def chat(self):
        if self._chat is None:
            self._chat = chat_tokenizer(self.tokenizer, self.key)
        return self._chat

    def _render(self, messages, where: str, **kw) -> list:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DataConfigError(f"{where}: expected a list of messages ({{'role': ..., 'content': ...}}) ({self.key})")
        out = self.chat.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return out

    def __call__(self, rec: dict, where: str) -> tuple[list, list]:
        tok = self.tokenizer
        if self.kind == "prompt-completion":
            prompt, completion = rec["prompt"], rec["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                p, c = tok.encode(prompt), tok.encode(completion) + [tok.eos_id]
                return p + c, [False] * len(p) + [True] * len(c)
            if isinstance(prompt, str) or isinstance(completion, str):
                raise DataConfigError(f"{where}: prompt and completion are both strings or both lists of "
                                      f"messages ({self.key})")
            p = list(self._render(prompt, where, add_generation_prompt=True)["input_ids"])
            full = list(self._render(prompt + completion, where)["input_ids"])
            n = common_prefix(p, full)
            return full, [False] * n + [True] * (len(full) - n)
        messages = rec[self.column or "messages"]
        if "{% generation" in str(self.chat.chat_template).replace("{%- generation", "{% generation"):
            out = self._render(messages, where, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
            if not any(mask):
                raise DataConfigError(f"{where}: no assistant tokens in this conversation ({self.key})")
            return ids, mask
        if not messages or messages[-1].get("role") != "assistant":
            raise DataConfigError(f"{where}: the last message is not the assistant's: with a chat template "
                                  "without {% generation %} markers, the last assistant message is what is "
                                  f"trained ({self.key})")
        p = list(self._render(messages[:-1], where, add_generation_prompt=True)["input_ids"])
        full = list(self._render(messages, where)["input_ids"])
        n = common_prefix(p, full)
        return full, [False] * n + [True] * (len(full) - n)
