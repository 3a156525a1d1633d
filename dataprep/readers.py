"""Streaming readers: JSONL (plain, .gz, .zst), Parquet, plain text, and local HF ``datasets`` folders.

Each reader yields ``Record(line, text, reason, raw)``: ``reason`` is ``None`` for a good record, else a
malformed-record reason (``bad_json``, ``bad_utf8``, ``not_an_object``, ``missing_text``,
``non_string_text``, ``empty_text``) with ``raw`` holding (a prefix of) the offending input.
``line`` is the 1-based line for text formats, the 0-based row for Parquet and HF datasets.

Plain text: a file is split into documents at blank lines (one or more lines holding only whitespace);
``line`` is the first line of the block. With ``text_split: file`` each file is one document.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

try:  # orjson parses bytes directly and is several times faster; the json module is the fallback
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    orjson = None

    def _loads(b: bytes):
        return json.loads(b.decode("utf-8"))

RAW_LIMIT = 2000  # characters of a malformed record kept in the rejects file


class Record(NamedTuple):
    line: int
    text: str | None
    reason: str | None
    raw: str | None = None


@dataclass(frozen=True)
class Source:
    """One input unit (a file, or an HF dataset folder) of one domain and split."""

    path: str
    fmt: str  # jsonl | parquet | text | hf

    @property
    def unit(self) -> str:
        return "row" if self.fmt in ("parquet", "hf") else "line"


_JSONL = (".jsonl", ".json", ".ndjson")
_COMPRESSED = (".gz", ".zst", ".zstd")


def is_hf_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def detect_format(path: str) -> str:
    if is_hf_dataset(path):
        return "hf"
    p = path.lower()
    for c in _COMPRESSED:
        if p.endswith(c):
            p = p[: -len(c)]
            break
    if p.endswith(_JSONL):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


class InputError(ValueError):
    """A data-config entry that does not resolve to readable inputs."""


def expand_entry(entry: str, key: str) -> list[Source]:
    """Expand one config path (file, folder or glob) into sorted sources; ``key`` names the config key."""
    entry = str(entry)
    if any(ch in entry for ch in "*?["):
        matches = sorted(glob.glob(entry, recursive=True))
        if not matches:
            raise InputError(f"{key}: no input matches the pattern {entry!r}")
    elif os.path.islink(entry) and not os.path.exists(entry):
        raise InputError(f"{key}: {entry!r} is a symbolic link that leads nowhere (a link loop or a missing "
                         f"target: {os.readlink(entry)!r})")
    elif not os.path.exists(entry):
        raise InputError(f"{key}: input not found: {entry!r} (relative paths resolve against the current "
                         f"directory {os.getcwd()!r})")
    else:
        matches = [entry]
    out: list[Source] = []
    for m in matches:
        if os.path.isdir(m) and not is_hf_dataset(m):
            files = []
            for root, dirs, names in os.walk(m):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if is_hf_dataset(root) and root != m:
                    files.append(root)
                    dirs[:] = []
                    continue
                files.extend(os.path.join(root, n) for n in names if not n.startswith("."))
            if not files:
                raise InputError(f"{key}: folder {m!r} holds no input files")
            out.extend(Source(f, detect_format(f)) for f in sorted(files))
        else:
            out.append(Source(m, detect_format(m)))
    return out


def _open_binary(path: str):
    p = path.lower()
    if p.endswith(".gz"):
        return gzip.open(path, "rb")
    if p.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _check_text(line: int, value, raw, present: bool) -> Record:
    if not present or value is None:
        return Record(line, None, "missing_text", raw)
    if not isinstance(value, str):
        return Record(line, None, "non_string_text", raw)
    if not value.strip():
        return Record(line, None, "empty_text", raw)
    return Record(line, value, None)


def read_jsonl(path: str, text_key: str = "text") -> Iterator[Record]:
    with _open_binary(path) as fb:
        for i, bline in enumerate(fb, start=1):
            if not bline.strip():
                continue  # blank lines hold no record
            try:
                obj = _loads(bline)
            except (ValueError, UnicodeDecodeError):
                try:
                    sline = bline.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(i, None, "bad_utf8", bline[:RAW_LIMIT].decode("utf-8", "replace"))
                    continue
                yield Record(i, None, "bad_json", sline[:RAW_LIMIT])
                continue
            if not isinstance(obj, dict):
                yield Record(i, None, "not_an_object", bline[:RAW_LIMIT].decode("utf-8", "replace"))
                continue
            value = obj.get(text_key)
            if isinstance(value, str) and value.strip():
                yield Record(i, value, None)
            else:
                yield _check_text(i, value, bline[:RAW_LIMIT].decode("utf-8", "replace"), text_key in obj)


def _read_columns(batches) -> Iterator[Record]:
    row = 0
    for batch in batches:
        for value in batch:
            yield _check_text(row, value, None if isinstance(value, str) else repr(value)[:RAW_LIMIT], True)
            row += 1


def read_parquet(path: str, text_key: str = "text") -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise InputError(f"{path}: Parquet file has no column {text_key!r} (prep.text_key); "
                         f"columns: {pf.schema_arrow.names}")
    yield from _read_columns(b.column(0).to_pylist() for b in pf.iter_batches(batch_size=1024, columns=[text_key]))


def read_hf(path: str, text_key: str = "text", split: str | None = None) -> Iterator[Record]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{path}: HF DatasetDict has splits {list(ds)}, none named {split!r}")
        ds = ds[split]
    if text_key not in ds.column_names:
        raise InputError(f"{path}: HF dataset has no column {text_key!r} (prep.text_key); columns: {ds.column_names}")
    ds = ds.select_columns([text_key])
    yield from _read_columns(b[text_key] for b in ds.iter(batch_size=1024))


_UNDECODABLE = re.compile("[\udc80-\udcff]")   # bytes that are not UTF-8, as surrogateescape keeps them


def _bad_text(line: int, text: str) -> Record:
    raw = text.encode("utf-8", "surrogateescape")[:RAW_LIMIT].decode("utf-8", "replace")
    return Record(line, None, "bad_utf8", raw)


def read_text(path: str, text_split: str = "paragraph") -> Iterator[Record]:
    """Documents of a plain text file. A document holding bytes that are not UTF-8 becomes a ``bad_utf8``
    record whose ``line`` is the first such line (training stops there, naming it; dataprep rejects it)."""
    # .gz / .zst plain text is decompressed like JSONL (detect_format strips the suffix)
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="surrogateescape", newline=None) as f:
        if text_split == "file":
            text = f.read()
            bad = _UNDECODABLE.search(text)
            yield _check_text(1, text, None, True) if bad is None else _bad_text(text.count("\n", 0, bad.start()) + 1, text)
            return
        if text_split != "paragraph":
            raise InputError(f"prep.text_split must be 'paragraph' or 'file', got {text_split!r}")
        block: list[str] = []
        start = bad_line = 0
        for i, line in enumerate(f, start=1):
            if line.strip():
                if not block:
                    start = i
                if not bad_line and _UNDECODABLE.search(line):
                    bad_line = i
                block.append(line)
            elif block:
                yield _bad_text(bad_line, "".join(block)) if bad_line else Record(start, "".join(block), None)
                block, bad_line = [], 0
        if block:
            yield _bad_text(bad_line, "".join(block)) if bad_line else Record(start, "".join(block), None)


SNIFF_BYTES = 8192


def check_not_binary(path: str) -> None:
    """Refuse a file that is not text by its content: NUL bytes in its first KB, or a start that is mostly
    not UTF-8 (a shared library, an image, an archive given a .txt/.jsonl name or found in a folder)."""
    try:
        with _open_binary(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    if b"\0" in head[:1024]:
        raise InputError(f"{path}: binary file (NUL bytes in its first KB), not text or JSONL: leave it out of the "
                         "data config")
    if head:
        kept = head.decode("utf-8", "ignore").encode("utf-8")
        if len(head) - len(kept) > max(16, len(head) // 4):
            raise InputError(f"{path}: binary file ({len(head) - len(kept)} of its first {len(head)} bytes are not "
                             "UTF-8), not text or JSONL: leave it out of the data config")


def read_source(src: Source, text_key: str = "text", text_split: str = "paragraph",
                split: str | None = None) -> Iterator[Record]:
    if src.fmt in ("jsonl", "text"):
        check_not_binary(src.path)
    if src.fmt == "jsonl":
        return _whole(src.path, read_jsonl(src.path, text_key))
    if src.fmt == "parquet":
        return read_parquet(src.path, text_key)
    if src.fmt == "hf":
        return read_hf(src.path, text_key, split)
    return _whole(src.path, read_text(src.path, text_split))


def _decompression_errors() -> tuple:
    import zlib

    errors = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _whole(path: str, records: Iterator[Record]) -> Iterator[Record]:
    """A compressed file that ends early or is damaged (a truncated `.gz`) is named, not a traceback."""
    try:
        yield from records
    except _decompression_errors() as e:
        raise InputError(f"{path}: compressed file is truncated or damaged ({e}); re-download or re-compress it, "
                         "or leave it out of the data config") from None
