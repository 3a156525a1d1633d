"""Where dataflex's shipped files are: the config groups (`configs/`) and the embedded corpus (`data/default/`).

In a clone they sit at the checkout's root, where users edit them; an installed wheel carries the same files
as package data under `dataflex/_share/` (setup.py maps them there). dataprep finds them the same way."""
from __future__ import annotations

from pathlib import Path

from dataprep.tokenizer import share_root

__all__ = ["configs_dir", "share_root"]


def configs_dir() -> Path:
    return share_root() / "configs"
