"""LESS's features (Xia et al., ICML 2024), computed and kept: everything between the signals and the
per-checkpoint [N, subtasks] mean cosines that the plugin (plugin.py) aggregates.

- `LessFeatures`: at one checkpoint (the current parameters and optimizer state), the target subtasks,
  the Adam moments (`state.signals.optimizer_state`), the plain SGD features of the target samples
  (`signals.target_grad`) and the Adam (or SGD) features of the pool in chunks of `chunk_size` x ranks
  (`signals.per_sample_grads`; on several ranks each rank its contiguous slice of a chunk, the cosines,
  and with a store the features, gathered in rank order), all projected and L2-normalised, and their
  mean cosine with each subtask (`checkpoint_cosines`).
- `FeatureStore`: one checkpoint's features on disk under `features_dir`, written chunk by chunk by
  rank 0: checkpoint_{i}_train.npy ([pool, dim] float16, row = global sample id, memory-mappable),
  checkpoint_{i}_target.npy ([targets, dim] float16), checkpoint_{i}_cos.npy ([pool, subtasks]
  float64) beside checkpoint_{i}.json (step, mean lr, projector and seed, betas, eps, subtasks, rows
  done). Opening a checkpoint whose description matches an unfinished one on disk continues it from
  the rows done (launch/score.py after a crash).
- `save_scores` (scores.npy, scores_per_subtask.npy beside the checkpoints) and `load_selection` (the
  `sample_ids` of a less_selection.json as a keep mask over this run's pool).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from dataflex.core.state import DataState
from dataflex.core.targets import evenly_spaced, resolve_target
from dataflex.selectors.less.math import adam_feature, l2_normalize, subtask_cosines
from dataflex.utils import dist


class FeatureStore:
    """Checkpoint i's features and cosines on disk; `meta` is its JSON description (meta["done"]: the
    pool rows written, set from the file when an unfinished checkpoint with the same description is
    continued)."""

    def __init__(self, folder: str, i: int, meta: dict, N: int, J: int, target_feat: torch.Tensor):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.meta, self.meta_path = meta, folder / f"checkpoint_{i}.json"
        paths = {k: folder / v for k, v in meta["files"].items()}
        mode = "w+"
        if self.meta_path.exists() and all(p.exists() for p in paths.values()):
            old = json.loads(self.meta_path.read_text())
            if {k: v for k, v in old.items() if k != "done"} == {k: v for k, v in meta.items() if k != "done"}:
                meta["done"], mode = old["done"], "r+"          # continue an unfinished checkpoint
        np.save(paths["target"], target_feat.numpy().astype(np.float16))
        self.meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        self.train = np.lib.format.open_memmap(paths["train"], mode=mode, dtype=np.float16, shape=(N, meta["dim"]))
        self.cos = np.lib.format.open_memmap(paths["cosines"], mode=mode, dtype=np.float64, shape=(N, J))

    @property
    def done(self) -> int:
        return self.meta["done"]

    def cosines_done(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.cos[:self.done]))

    def write(self, start: int, feat: torch.Tensor, cos: torch.Tensor) -> None:
        """Rows start.. of the pool: features (stored as float16) and cosines, then the rows done."""
        end = start + len(cos)
        self.train[start:end] = feat.numpy().astype(np.float16)
        self.cos[start:end] = cos.numpy()
        self.train.flush()
        self.cos.flush()
        self.meta["done"] = end
        self.meta_path.write_text(json.dumps(self.meta, indent=2) + "\n")


def save_scores(folder: str, scores: torch.Tensor, per_subtask: torch.Tensor) -> None:
    np.save(Path(folder) / "scores.npy", scores.numpy())
    np.save(Path(folder) / "scores_per_subtask.npy", per_subtask.numpy())


def load_selection(path: str, N: int) -> torch.Tensor:
    """The keep mask [N] of a less_selection.json's `sample_ids` (global ids of this run's pool)."""
    saved = json.loads(Path(path).read_text())
    ids = torch.as_tensor(saved["sample_ids"], dtype=torch.long)
    if len(ids) == 0 or int(ids.max()) >= N or int(ids.min()) < 0:
        raise ValueError(f"selector.selection={path}: sample ids must lie in [0, {N}) (the pool of "
                         "this run's data config)")
    keep = torch.zeros(N, dtype=torch.bool)
    keep[ids] = True
    return keep


class LessFeatures:
    """The feature side of LESS with the plugin's settings: `feature` "adam" (m'/sqrt(v'+eps) with the
    run's moments) or "sgd" for the pool, plain gradients for the target, `params` the parameters the
    gradients are taken of, `projector` a dataflex projector or None (exact features)."""

    def __init__(self, target: list, params, feature: str, projector, dim: int, target_samples: Optional[int],
                 chunk_size: int, features_dir: Optional[str] = None, progress: bool = True):
        self.target, self.params, self.feature, self.projector = target, params, feature, projector
        self.dim, self.target_samples, self.chunk_size = dim, target_samples, chunk_size
        self.features_dir, self.progress = features_dir, progress

    def describe(self) -> dict:
        return self.projector.describe() if self.projector is not None else {"projector": "none"}

    def subtasks(self, state: DataState) -> list:
        """[(name, dataset, ids)]: one per target domain (a target dataset with several domains gives
        several), each at most `target_samples`, evenly spaced."""
        out = []
        for spec in self.target:
            ids, dataset = resolve_target(state, spec)
            dom = torch.as_tensor(dataset.domain[ids]) if dataset is not None else torch.zeros(len(ids))
            if len(dom.unique()) > 1:                # a target dataset with several domains
                for k, name in enumerate(dataset.names):
                    part = ids[dom == k]
                    if len(part):
                        out.append((f"{spec}/{name}", dataset, evenly_spaced(part, self.target_samples)))
            else:
                out.append((spec, dataset, evenly_spaced(ids, self.target_samples)))
        return out

    def moments(self, signals) -> dict:
        """The optimizer's Adam state of `params`, flattened in parameter order."""
        full = signals.optimizer_state(self.params)
        names = list(full["state"])
        return {"exp_avg": torch.cat([full["state"][n]["exp_avg"].flatten() for n in names]),
                "exp_avg_sq": torch.cat([full["state"][n]["exp_avg_sq"].flatten() for n in names]),
                "betas": full["betas"], "eps": full["eps"]}

    def featurize(self, grads: torch.Tensor, opt: Optional[dict]) -> torch.Tensor:
        """[B, P] per-sample gradients -> [B, dim] float64 unit features (the Adam feature when
        feature="adam")."""
        if self.feature == "adam":
            grads = adam_feature(grads, opt["exp_avg"], opt["exp_avg_sq"], opt["betas"], opt["eps"])
        if self.projector is not None:
            grads = self.projector.project(grads.float())
        return l2_normalize(grads.double())

    def target_features(self, signals, subtasks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """([M, dim] unit SGD features of every subtask's target samples, [M] their subtask)."""
        target, which = [], []
        for j, (_, dataset, ids) in enumerate(subtasks):
            for sid in ids.tolist():
                g = signals.target_grad(torch.tensor([sid]), self.params, dataset=dataset)
                target.append(torch.cat([t.flatten() for t in g.values()]))
                which.append(j)
        target_raw = torch.stack(target).float()
        target_feat = l2_normalize(self.projector.project(target_raw).double() if self.projector is not None
                                   else target_raw.double())
        return target_feat, torch.tensor(which)

    def pool_features(self, signals, ids: torch.Tensor, opt: Optional[dict], world_size: int) -> torch.Tensor:
        """Features of the pool samples `ids`; on several ranks, of this rank's contiguous slice only (a
        rank with none still runs one sample, dropped, so every rank makes the same calls)."""
        if world_size == 1:
            return self.featurize(signals.per_sample_grads(ids, self.params).flat().float().cpu(), opt)
        flex = signals.flex
        mine = flex.sampler.rank_slice(ids)
        batch = flex.data.batch(mine if len(mine) else ids[:1])
        feat = self.featurize(flex.interface.per_sample_grads(batch, self.params).flat().float().cpu(), opt)
        return feat[:len(mine)]

    def open_store(self, i: int, N: int, step: int, lr: float, subtask_names: list, optim_meta: dict,
                   target_feat: torch.Tensor) -> FeatureStore:
        d = self.dim if self.projector is not None else target_feat.shape[1]
        meta = {"checkpoint": i, "step": step, "mean_lr": lr, "feature": self.feature,
                "params": self.params, "projector": self.describe(), "subtasks": subtask_names,
                "target": self.target, "pool_size": N, "dim": d, **optim_meta,
                "files": {"train": f"checkpoint_{i}_train.npy", "target": f"checkpoint_{i}_target.npy",
                          "cosines": f"checkpoint_{i}_cos.npy"},
                "note": "train/target rows: L2-normalised features, float16 (train row = global sample id); "
                        "cosines: [pool, subtasks] mean cosine with each target subtask, float64", "done": 0}
        return FeatureStore(self.features_dir, i, meta, N, len(subtask_names), target_feat)

    def checkpoint_cosines(self, state: DataState, i: int, step: int, lr: float,
                           pool_ids: Optional[torch.Tensor] = None, of: int = 1,
                           optim_meta: Optional[dict] = None) -> tuple[torch.Tensor, list, dict]:
        """(cosines [N, J], the subtask names, the optimizer's betas and eps (`optim_meta` unchanged with
        feature="sgd")) at the current parameters and optimizer state, checkpoint i of `of`: see
        LessSelector.checkpoint_cosines. The store (with `features_dir`, on rank 0, the whole pool only)
        tells every rank where to continue."""
        signals, rank0 = state.signals, dist.rank() == 0
        opt, optim_meta = None, dict(optim_meta or {})
        if self.feature == "adam":
            opt = self.moments(signals)
            optim_meta = {"betas": list(opt["betas"]), "eps": opt["eps"]}
        subtasks = self.subtasks(state)
        names = [name for name, _, _ in subtasks]
        target_feat, which = self.target_features(signals, subtasks)
        pool = torch.arange(sum(state.domain_sizes)) if pool_ids is None else torch.as_tensor(pool_ids).long()
        J, N = len(subtasks), len(pool)
        store = self.open_store(i, N, step, lr, names, optim_meta, target_feat) if self.features_dir and rank0 \
            and pool_ids is None else None
        out = torch.zeros(N, J, dtype=torch.float64)
        done = 0
        if store is not None:
            done = store.done
            out[:done] = store.cosines_done()
        W = state.world_size
        if W > 1:                            # rank 0's store says where every rank continues
            done = dist.broadcast_object(done)
            if done:
                out[:done] = dist.broadcast_object(out[:done])
        bar = tqdm(total=N, initial=done, desc=f"less checkpoint {i + 1}/{of} (step {step})",
                   disable=not (self.progress and rank0), leave=False, dynamic_ncols=True)
        for start in range(done, N, self.chunk_size * W):
            ids = pool[start:start + self.chunk_size * W]
            feat = self.pool_features(signals, ids, opt, W)
            cos = subtask_cosines(feat, target_feat, which, J, normalize=False)
            if W > 1:                        # every rank scored its slice: gathered in rank (= id) order
                cos = dist.all_gather_cat(cos)
                if self.features_dir:
                    feat = dist.all_gather_cat(feat.float())
            out[start:start + len(ids)] = cos
            if store is not None:
                store.write(start, feat, out[start:start + len(ids)])
            bar.update(len(ids))
        bar.close()
        return out, names, optim_meta
