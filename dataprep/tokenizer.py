"""The training tokenizer: a Hugging Face `tokenizers` JSON file, loaded offline."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as _HFTokenizer

EOS_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER = "data/default/tokenizer.json"   # the embedded corpus's byte-level BPE, relative to share_root()


def share_root() -> Path:
    """Where `configs/` and `data/default/` are: a clone's root, or an installed wheel's `dataflex/_share/`."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / DEFAULT_TOKENIZER).is_file() else here / "dataflex" / "_share"


REPO_ROOT = share_root()      # relative data paths of the shipped configs are taken from here


def default_tokenizer_path() -> str:
    """The embedded corpus's tokenizer, as an absolute path."""
    return str(REPO_ROOT / DEFAULT_TOKENIZER)


class Tokenizer:
    """Thin wrapper that knows its file's hash and its end-of-document id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:      # the tokenizers library raises a bare Exception for a damaged file
            raise ValueError(f"data.tokenizer: {self.path} is not a readable tokenizer ({e})") from None
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        eos = self._tok.token_to_id(EOS_TOKEN)
        if eos is None:     # the folder's declared eos_token (tokenizer_config.json), else a usual name; never 0
            eos = find_eos(self._tok, self.path)
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, or a Hugging Face model / tokenizer folder (dataflex.models.hf.HFTokenizer)."""
    if Path(str(path)).is_dir():
        return HFTokenizer(path)
    return Tokenizer(path)


# End-of-document token names, in the order they are tried when a tokenizer declares none.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _token_name(entry) -> Optional[str]:
    if isinstance(entry, dict):                  # {"content": "</s>", ...} (AddedToken)
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


def special_token(tok, folder: Path, kind: str) -> Optional[int]:
    """The id of a special token (`eos`, `pad`, `bos`) a tokenizer folder declares: tokenizer_config.json,
    special_tokens_map.json, then config.json / generation_config.json's `<kind>_token_id`."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _token_name(_read_json(folder / name).get(f"{kind}_token"))
        if token is not None:
            tid = tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"{folder / name}: {kind}_token {token!r} is not in the tokenizer's vocabulary")
            return tid
    for name in ("generation_config.json", "config.json"):
        tid = _read_json(folder / name).get(f"{kind}_token_id")
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if isinstance(tid, int):
            return tid
    return None


def find_eos(tok, path: Path, eos_token: Optional[str] = None) -> int:
    """The end-of-document id: `eos_token` if given, else what the tokenizer's folder declares, else
    the first of the usual names present in the vocabulary; never a silent 0."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if eos_token is not None:
        tid = tok.token_to_id(eos_token)
        if tid is None:
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary of {path}")
        return tid
    tid = special_token(tok, folder, "eos")
    if tid is not None:
        return tid
    for name in EOS_NAMES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    raise ValueError(f"{path}: no end-of-document token: the tokenizer declares no eos_token (tokenizer_config.json) "
                     f"and has none of {list(EOS_NAMES)}; add `\"eos_token\": \"...\"` to tokenizer_config.json")


class HFTokenizer(Tokenizer):
    """A Hugging Face model directory's tokenizer (its tokenizer.json, or one converted from a
    sentencepiece model by transformers), with the same surface as `dataprep.tokenizer.Tokenizer`:
    `path`, `sha256`, `eos_id`, `pad_id`, `vocab_size`, `encode`, `encode_batch`, `decode`, `describe`.
    EOS and pad come from the folder's declared special tokens (pad = EOS when none is declared)."""

    def __init__(self, path: str | Path, eos_token: Optional[str] = None):
        from tokenizers import Tokenizer as _Tok

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        file = folder / "tokenizer.json"
        if file.is_file():
            self._tok = _Tok.from_file(str(file))
            self.path = file
            raw = file.read_bytes()
        else:
            if not any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.model", "vocab.json")):
                raise FileNotFoundError(f"{folder} holds no tokenizer (tokenizer.json, tokenizer_config.json, "
                                        "tokenizer.model); name one with data.tokenizer=PATH")
            from transformers import AutoTokenizer

            fast = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
            self._tok = fast.backend_tokenizer
            self.path = folder
            raw = self._tok.to_str().encode()
        self.folder = folder
        self.eos_id = find_eos(self._tok, folder, eos_token)
        pad = special_token(self._tok, folder, "pad")
        self.pad_id = self.eos_id if pad is None else pad
        self.vocab_size = self._tok.get_vocab_size()
        h = hashlib.sha256(raw)
        h.update(f"eos={self.eos_id}".encode())
        self.sha256 = h.hexdigest()

    def describe(self) -> dict:        # encode/encode_batch/decode: Tokenizer's, over self._tok
        return {**super().describe(), "pad_id": self.pad_id}


def has_tokenizer(folder) -> bool:
    folder = Path(str(folder))
    return folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
