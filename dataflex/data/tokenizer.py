"""The training tokenizer (dataprep.tokenizer), loaded with its config key named on failure."""
from __future__ import annotations

import os

from dataflex.utils.errors import ConfigError
from dataprep.tokenizer import EOS_TOKEN, HFTokenizer, Tokenizer, load_tokenizer  # noqa: F401


def load_tokenizer_checked(path, key: str = "data.tokenizer"):
    """dataprep.tokenizer.load_tokenizer, a missing or unreadable file named with its config key."""

    if not os.path.exists(str(path)):
        raise ConfigError(f"{key}: tokenizer not found: {path!r} (a tokenizers JSON file or a Hugging Face "
                          "tokenizer folder; leave the key out for the embedded corpus's)")
    try:
        return load_tokenizer(path)
    except Exception as e:      # tokenizers' parser: "expected value at line 1 column 1", ...
        raise ConfigError(f"{key}: {path} is not a readable tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); expected a Hugging Face tokenizers JSON "
                          "file or tokenizer folder") from None
