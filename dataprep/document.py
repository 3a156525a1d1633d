"""The unit of work flowing through the operator chain."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    """One document (datatrove-compatible shape: text, id, metadata).

    ``metadata`` carries lineage: ``domain``, ``split``, ``source`` (input file), ``line`` (1-based line
    for text formats, 0-based row for Parquet / HF datasets), and what steps attach (signatures, tokens).
    """

    text: str
    id: str
    metadata: dict = field(default_factory=dict)
