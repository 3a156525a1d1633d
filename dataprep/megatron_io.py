"""megatron-core's indexed dataset (the .bin/.idx shard format), imported without its import-time warnings:
megatron.core warns that Transformer Engine and Apex are absent, which says nothing about reading shards."""
from __future__ import annotations

import warnings


def indexed_dataset():
    """(IndexedDataset, IndexedDatasetBuilder), imported quietly on first use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    return IndexedDataset, IndexedDatasetBuilder
