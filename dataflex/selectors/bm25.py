"""BM25 keyword retrieval of target-like data: the lexical baseline that attribution leaderboards find ahead of
gradient cosine and TRAK (Robertson & Zaragoza 2009 for BM25; bm25s, Lù 2024, for the implementation).

The pool's texts (every sample's tokens decoded by the run's tokenizer) are indexed by the `bm25s` package
(Lucene's BM25 variant by default: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term weight
tf · (k1 + 1) / (tf + k1 · (1 - b + b · |z| / avg|z|)); words of two or more letters, lower-cased, English
stop words left out). Each target sample is a query; the score of a pool sample z is

    S(z) = mean (or max, `aggregate=max`) over target samples q of BM25(z; q),

and the top `keep_fraction` of the pool by S is kept from step 0 through the sampler's pool masks (ties to
the lower index). Needs `pip install bm25s` (dataflex-train[bench]).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from dataflex.core.state import DataState
from dataflex.selectors.embedding import as_list, check_vocab, run_tokenizer, sample_texts
from dataflex.selectors.less.math import top_fraction
from dataflex.selectors.pool import PoolSelector

AGGREGATES = ("mean", "max")


def _bm25s():
    try:
        import bm25s
    except ImportError as e:
        raise ImportError("selector=bm25 needs the bm25s package: pip install bm25s") from e
    return bm25s


def bm25_scores(pool: Sequence[str], target: Sequence[str], k1: float = 1.5, b: float = 0.75,
                method: str = "lucene", aggregate: str = "mean", stopwords: Optional[str] = "en") -> np.ndarray:
    """[len(pool)] float64: each pool text's BM25 score against every target text as a query (bm25s, its
    default tokenisation), aggregated over the targets by `mean` or `max`. A target with no word in the pool's
    vocabulary scores 0 everywhere."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    bm25s = _bm25s()
    index = bm25s.BM25(k1=k1, b=b, method=method)
    index.index(bm25s.tokenize(list(pool), stopwords=stopwords, show_progress=False), show_progress=False)
    queries = bm25s.tokenize(list(target), stopwords=stopwords, return_ids=False, show_progress=False)
    out = np.zeros(len(pool), dtype=np.float64)
    for i, words in enumerate(queries):
        ids = index.get_tokens_ids(words)
        scores = index.get_scores_from_ids(ids).astype(np.float64) if ids else np.zeros(len(pool))
        out = out + scores if aggregate == "mean" else np.maximum(out, scores) if i else scores
    return out / max(len(queries), 1) if aggregate == "mean" else out


class BM25Selector(PoolSelector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "k1": "[0, inf)", "b": "[0, 1]", "target_samples": "[1, inf)",
                "aggregate": AGGREGATES, "method": ("lucene", "robertson", "atire", "bm25l", "bm25+")}
    export_name = "bm25_selection.json"

    def __init__(self, target: Union[str, Sequence[str]] = "target", keep_fraction: float = 0.1,
                 target_samples: Optional[int] = 256, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 aggregate: str = "mean", tokenizer: Optional[str] = None):
        super().__init__()
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"selector.aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        _bm25s()                                                         # fails early without the package
        self.target, self.keep_fraction, self.target_samples = as_list(target), keep_fraction, target_samples
        self.k1, self.b, self.method, self.aggregate, self.tokenizer = k1, b, method, aggregate, tokenizer

    def texts(self, state: DataState) -> tuple[list, list]:
        """(pool texts, target texts), decoded by the run's tokenizer."""
        from dataflex.core.targets import resolve_target

        flex = state.signals.flex
        tok = run_tokenizer(state, self.tokenizer)
        pool_ids = torch.arange(len(flex.data))
        check_vocab(flex.data, pool_ids, tok)
        target = []
        for spec in self.target:
            ids, dataset = resolve_target(state, spec, self.target_samples)
            target += sample_texts(dataset if dataset is not None else flex.data, ids, tok)
        return sample_texts(flex.data, pool_ids, tok), target

    def choose(self, state: DataState):
        pool, target = self.texts(state)
        scores = torch.from_numpy(bm25_scores(pool, target, self.k1, self.b, self.method, self.aggregate))
        return top_fraction(scores, self.keep_fraction), scores

    def describe(self) -> dict:
        return {"keep_fraction": self.keep_fraction, "target": self.target, "k1": self.k1, "b": self.b,
                "method": self.method, "aggregate": self.aggregate}
