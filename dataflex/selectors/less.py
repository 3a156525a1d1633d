"""LESS: gradient-based targeted data selection (Xia, Malladi, Gururangan, Arora, Chen; ICML 2024).

The whole recipe as one plugin, acting on the data state only (pool masks) and reading signals
(per-sample gradients, target gradients, the optimizer's Adam state):

1. Warm-up. For the first `warmup_steps` steps the pool is a seeded random `warmup_fraction` (5%)
   of every domain (`state.pool_masks`); by default `warmup_epochs` (4) passes over it. At
   `num_checkpoints` (4) evenly spaced points of the warm-up (LESS: after each epoch) the plugin
   takes a "checkpoint" of the live run: parameters theta_i and the optimizer's moments (m_i, v_i).
2. Features at checkpoint i, for every pool sample z (exact per-sample gradients g of the chosen
   parameters, `params`, LoRA adapters by default), LESS's Adam feature

       m' = b1 m_i + (1 - b1) g,   v' = b2 v_i + (1 - b2) g^2,   Gamma = m' / sqrt(v' + eps)

   (eps inside the square root, no bias correction: LESS's code; the run's own betas and eps), and
   the plain SGD gradient of every target sample z'. Both are projected by one seeded projector
   (`projector=sparse`: dataflex's sparse JL; `rademacher`: TRAK/LESS's dense signs; `none`: exact)
   and L2-normalised, so inner products are cosines.
3. Score. Inf(z, z') = sum_i eta_i cos(Phi Gamma_i(z), Phi grad l(z'; theta_i)), eta_i the mean
   learning rate over warm-up segment i, renormalised to sum to 1 (LESS's matching.py);
   S(z) = max_j mean_{z' in subtask j} Inf(z, z'). Subtasks: the target's domains when the target
   dataset has several (or several targets are named, `target=[math, code]`), else one. Unlike
   LESS's reshape(N, m, -1), subtasks may differ in size.
4. Select. From the step after the warm-up the pool is the top `keep_fraction` (5%) by S, through
   per-domain pool masks; with no mixer the session draws domains in proportion to what each keeps,
   so the selection decides the training distribution.

Only per-checkpoint [N, subtasks] mean cosines are kept in memory and in `state_dict` (features are
never needed again); with `features_dir` each checkpoint's features go to disk as memory-mappable
float16 `.npy` files beside a JSON description (projector, seed, step, lr, betas, eps), with the
final scores. `exports` gives `less_selection.json` (kept ids, their scores, per-domain counts,
checkpoint steps and weights); `selection=PATH` starts a run from such a file, without warm-up.
Online mode (`rescore_every=N`): after the selection, every N steps the pool is re-scored at the
current parameters and moments (one checkpoint) and the kept pool replaced.

Deviations: the live run is the warm-up model (LESS trains a separate LoRA warm-up model, then
the target model from scratch on the selection: here training continues from the warm-up weights;
with `model.lora_rank` the run trains whatever its optimizer holds, LoRA adapters and base weights
alike, while the features use the adapters). On several ranks the warm-up fraction, the target
features and the moments are the same on every rank; each rank computes the features of its
contiguous slice of every chunk of `chunk_size` x ranks pool samples, and the cosines (with
`features_dir`, the features too) are gathered, so every rank selects the same samples. Under
DeepSpeed ZeRO 1/2 or bf16, the moments are assembled by DeepSpeed's `safe_get_full_optimizer_state`
(see Signals.optimizer_state).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from dataflex.core.events import Event
from dataflex.core.plugin import Selector
from dataflex.core.state import DataState, keep_pool
from dataflex.core.targets import evenly_spaced, resolve_target
from dataflex.selectors.less_math import (  # noqa: F401
    FEATURES,
    PROJECTORS,
    adam_feature,
    aggregate,
    checkpoint_weights,
    l2_normalize,
    less_scores,
    make_projector,
    subtask_cosines,
    subtask_matrix,
    top_fraction,
)
from dataflex.utils import dist


class LessSelector(Selector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"warmup_fraction": "(0, 1]", "warmup_epochs": "(0, inf)", "warmup_steps": "[1, inf)",
                "num_checkpoints": "[1, inf)", "keep_fraction": "(0, 1]", "dim": "[1, inf)",
                "projector": ('sparse', 'rademacher', 'none'), "target_samples": "[1, inf)",
                "chunk_size": "[1, inf)", "feature": ('adam', 'sgd'), "rescore_every": "[1, inf)"}
    candidate_factor = 1.0
    events = (Event.BEFORE_SAMPLE, Event.AFTER_CANDIDATES)

    def __init__(self, target: Union[str, Sequence[str]] = "target", params="lora", warmup_fraction: float = 0.05,
                 warmup_epochs: float = 4, warmup_steps: Optional[int] = None, num_checkpoints: int = 4,
                 keep_fraction: float = 0.05, dim: int = 8192, projector: str = "sparse", projector_seed: int = 0,
                 target_samples: Optional[int] = 64, chunk_size: int = 64, feature: str = "adam", seed: int = 0,
                 features_dir: Optional[str] = None, selection: Optional[str] = None, progress: bool = True,
                 rescore_every: Optional[int] = None):
        for name, value in (("warmup_fraction", warmup_fraction), ("keep_fraction", keep_fraction)):
            if not 0 < value <= 1:
                raise ValueError(f"selector.{name} must be in (0, 1], got {value}")
        if num_checkpoints < 1:
            raise ValueError(f"selector.num_checkpoints must be >= 1, got {num_checkpoints}")
        if feature not in FEATURES:
            raise ValueError(f"selector.feature must be one of {FEATURES}, got {feature!r}")
        make_projector(projector, dim, projector_seed)                       # validates
        self.target = [target] if isinstance(target, str) else list(target)
        self.params = params if isinstance(params, str) else list(params)
        self.warmup_fraction, self.warmup_epochs, self.warmup_steps = warmup_fraction, warmup_epochs, warmup_steps
        self.num_checkpoints, self.keep_fraction = num_checkpoints, keep_fraction
        self.dim, self.projector_kind, self.projector_seed = dim, projector, projector_seed
        self.target_samples, self.chunk_size, self.feature, self.seed = target_samples, chunk_size, feature, seed
        self.features_dir, self.selection, self.progress = features_dir, selection, progress
        if rescore_every is not None and rescore_every < 1:
            raise ValueError(f"selector.rescore_every must be >= 1 or null, got {rescore_every}")
        self.rescore_every = rescore_every
        self.projector = make_projector(projector, dim, projector_seed)
        # what state_dict holds
        self.phase = "init"
        self.checkpoint_steps: list[int] = []
        self.lr_sum: list[float] = []
        self.lr_count: list[int] = []
        self.per_checkpoint: list[torch.Tensor] = []          # [N, J] float64 each
        self.scores: Optional[torch.Tensor] = None            # [N] float64 after selection
        self.per_subtask: Optional[torch.Tensor] = None       # [N, J]
        self.kept_ids: Optional[torch.Tensor] = None
        self.pool_counts: Optional[list] = None
        self.subtask_names: list[str] = []
        self.optim_meta: dict = {}

    # -- events ----------------------------------------------------------------------------------
    def apply(self, event, state: DataState) -> None:
        if event == Event.BEFORE_SAMPLE:
            self.before_sample(state)
        else:                            # a pass-through selector: the pool masks did the selecting
            state.keep_mask = torch.ones(len(state.candidate_ids), dtype=torch.bool)

    def before_sample(self, state: DataState) -> None:
        if self.phase == "init":
            self._start(state)
        if self.phase == "warmup":
            i = len(self.per_checkpoint)
            while i < self.num_checkpoints and state.step >= self.checkpoint_steps[i]:
                self._checkpoint(state, i)
                i += 1
            if i == self.num_checkpoints:
                self._select(state)
            else:
                self.lr_sum[i] += self._lr(state)
                self.lr_count[i] += 1
        elif self.phase == "selected" and self.rescore_every and self.warmup_steps is not None \
                and state.step > self.warmup_steps and (state.step - self.warmup_steps) % self.rescore_every == 0:
            self._rescore(state)
        state.metrics["selector/phase"] = self.phase
        for name, n in zip(state.domains, self.pool_counts or []):
            state.metrics[f"selector/kept/{name}"] = n

    # -- warm-up ---------------------------------------------------------------------------------
    def _start(self, state: DataState) -> None:
        if self.selection is not None:
            self._load_selection(state)
            return
        if self.feature == "adam" and getattr(state.signals, "flex", None) is not None \
                and state.signals.flex.optimizer is None:
            raise RuntimeError("less needs the optimizer's Adam moments: DataFlex(..., optimizer=opt) "
                               "(launch/train.py passes it)")
        g = torch.Generator().manual_seed(self.seed)
        counts = []
        for d, n in enumerate(state.domain_sizes):
            k = max(1, round(self.warmup_fraction * n))
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=g)[:k]] = True
            state.pool_masks[d] = mask
            counts.append(k)
        self.pool_counts = counts
        steps = self.warmup_steps
        if steps is None:
            steps = math.ceil(self.warmup_epochs * sum(counts) / state.global_batch_size)
        if steps < self.num_checkpoints:
            raise ValueError(f"selector.warmup_steps={steps} is fewer than selector.num_checkpoints="
                             f"{self.num_checkpoints}")
        self.warmup_steps = int(steps)
        self.checkpoint_steps = [round(steps * (i + 1) / self.num_checkpoints) for i in range(self.num_checkpoints)]
        self.lr_sum, self.lr_count = [0.0] * self.num_checkpoints, [0] * self.num_checkpoints
        self.phase = "warmup"

    def _lr(self, state: DataState) -> float:
        flex = getattr(state.signals, "flex", None)
        if flex is not None and flex.optimizer is None:          # feature=sgd without an optimizer
            return 1.0
        return state.signals.optimizer_state(self.params, moments=False)["lr"]

    def _subtasks(self, state: DataState) -> list:
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

    def _features(self, grads: torch.Tensor, opt: Optional[dict]) -> torch.Tensor:
        if self.feature == "adam":
            grads = adam_feature(grads, opt["exp_avg"], opt["exp_avg_sq"], opt["betas"], opt["eps"])
        if self.projector is not None:
            grads = self.projector.project(grads.float())
        return l2_normalize(grads.double())

    def _pool_features(self, signals, ids: torch.Tensor, opt: Optional[dict], world_size: int) -> torch.Tensor:
        """Features of the pool samples `ids`; on several ranks, of this rank's contiguous slice only (a
        rank with none still runs one sample, dropped, so every rank makes the same calls)."""
        if world_size == 1:
            return self._features(signals.per_sample_grads(ids, self.params).flat().float().cpu(), opt)
        flex = signals.flex
        mine = flex.sampler.rank_slice(ids)
        batch = flex.data.batch(mine if len(mine) else ids[:1])
        feat = self._features(flex.interface.per_sample_grads(batch, self.params).flat().float().cpu(), opt)
        return feat[:len(mine)]

    def _checkpoint(self, state: DataState, i: int) -> None:
        lr = self.lr_sum[i] / max(1, self.lr_count[i])
        self.per_checkpoint.append(self.checkpoint_cosines(state, i, self.checkpoint_steps[i], lr))

    def checkpoint_cosines(self, state: DataState, i: int, step: int, lr: float,
                           pool_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, J] (with `pool_ids`: [len(pool_ids), J] for those samples only, features not stored:
        cluster_less's representatives): for every pool sample, the mean cosine with each target
        subtask at the current parameters and optimizer state (checkpoint i): target SGD gradients,
        then the pool's Adam features in chunks. With `features_dir`, features and cosines are
        written as they come, with the rows done in checkpoint_i.json, and a call that finds a
        matching unfinished checkpoint there (same step, projector, pool, target) continues it
        (launch/score.py after a crash)."""
        signals, rank0 = state.signals, dist.rank() == 0
        opt = None
        if self.feature == "adam":
            full = signals.optimizer_state(self.params)
            names = list(full["state"])
            opt = {"exp_avg": torch.cat([full["state"][n]["exp_avg"].flatten() for n in names]),
                   "exp_avg_sq": torch.cat([full["state"][n]["exp_avg_sq"].flatten() for n in names]),
                   "betas": full["betas"], "eps": full["eps"]}
            self.optim_meta = {"betas": list(full["betas"]), "eps": full["eps"]}
        subtasks = self._subtasks(state)
        self.subtask_names = [name for name, _, _ in subtasks]
        target, which = [], []
        for j, (_, dataset, ids) in enumerate(subtasks):
            for sid in ids.tolist():
                g = signals.target_grad(torch.tensor([sid]), self.params, dataset=dataset)
                target.append(torch.cat([t.flatten() for t in g.values()]))
                which.append(j)
        target_raw = torch.stack(target).float()
        target_feat = l2_normalize(self.projector.project(target_raw).double() if self.projector is not None
                                   else target_raw.double())
        which = torch.tensor(which)
        pool = torch.arange(sum(state.domain_sizes)) if pool_ids is None else torch.as_tensor(pool_ids).long()
        J, N = len(subtasks), len(pool)
        store = self._open_store(i, N, J, step, lr, target_feat) if self.features_dir and rank0 \
            and pool_ids is None else None
        out = torch.zeros(N, J, dtype=torch.float64)
        done = 0
        if store is not None:
            done = store["meta"]["done"]
            out[:done] = torch.from_numpy(np.asarray(store["cos"][:done]))
        W = state.world_size
        if W > 1:                            # rank 0's store says where every rank continues
            done = dist.broadcast_object(done)
            if done:
                out[:done] = dist.broadcast_object(out[:done])
        bar = tqdm(total=N, initial=done, desc=f"less checkpoint {i + 1}/{self.num_checkpoints} (step {step})",
                   disable=not (self.progress and rank0), leave=False, dynamic_ncols=True)
        for start in range(done, N, self.chunk_size * W):
            ids = pool[start:start + self.chunk_size * W]
            feat = self._pool_features(signals, ids, opt, W)
            cos = subtask_cosines(feat, target_feat, which, J, normalize=False)
            if W > 1:                        # every rank scored its slice: gathered in rank (= id) order
                cos = dist.all_gather_cat(cos)
                if self.features_dir:
                    feat = dist.all_gather_cat(feat.float())
            out[start:start + len(ids)] = cos
            if store is not None:
                store["train"][start:start + len(ids)] = feat.numpy().astype(np.float16)
                store["cos"][start:start + len(ids)] = out[start:start + len(ids)].numpy()
                store["train"].flush()
                store["cos"].flush()
                store["meta"]["done"] = start + len(ids)
                store["meta_path"].write_text(json.dumps(store["meta"], indent=2) + "\n")
            bar.update(len(ids))
        bar.close()
        return out

    def _open_store(self, i: int, N: int, J: int, step: int, lr: float, target_feat: torch.Tensor) -> dict:
        folder = Path(self.features_dir)
        folder.mkdir(parents=True, exist_ok=True)
        d = self.dim if self.projector is not None else target_feat.shape[1]
        meta = {"checkpoint": i, "step": step, "mean_lr": lr, "feature": self.feature,
                "params": self.params, "projector": self._describe(), "subtasks": self.subtask_names,
                "target": self.target, "pool_size": N, "dim": d, **self.optim_meta,
                "files": {"train": f"checkpoint_{i}_train.npy", "target": f"checkpoint_{i}_target.npy",
                          "cosines": f"checkpoint_{i}_cos.npy"},
                "note": "train/target rows: L2-normalised features, float16 (train row = global sample id); "
                        "cosines: [pool, subtasks] mean cosine with each target subtask, float64", "done": 0}
        meta_path = folder / f"checkpoint_{i}.json"
        paths = {k: folder / v for k, v in meta["files"].items()}
        mode = "w+"
        if meta_path.exists() and all(p.exists() for p in paths.values()):
            old = json.loads(meta_path.read_text())
            if {k: v for k, v in old.items() if k != "done"} == {k: v for k, v in meta.items() if k != "done"}:
                meta["done"], mode = old["done"], "r+"          # continue an unfinished checkpoint
        np.save(paths["target"], target_feat.numpy().astype(np.float16))
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return {"meta": meta, "meta_path": meta_path,
                "train": np.lib.format.open_memmap(paths["train"], mode=mode, dtype=np.float16, shape=(N, d)),
                "cos": np.lib.format.open_memmap(paths["cosines"], mode=mode, dtype=np.float64, shape=(N, J))}

    def _describe(self) -> dict:
        return self.projector.describe() if self.projector is not None else {"projector": "none"}

    # -- selection -------------------------------------------------------------------------------
    def mean_lrs(self) -> list:
        return [s / max(1, c) for s, c in zip(self.lr_sum, self.lr_count)]

    def _select(self, state: DataState) -> None:
        self.scores, self.per_subtask = aggregate(torch.stack(self.per_checkpoint), self.mean_lrs())
        keep = top_fraction(self.scores, self.keep_fraction)
        self.kept_ids = torch.nonzero(keep).flatten()
        self._apply_keep(state, keep)
        if self.features_dir and dist.rank() == 0:
            np.save(Path(self.features_dir) / "scores.npy", self.scores.numpy())
            np.save(Path(self.features_dir) / "scores_per_subtask.npy", self.per_subtask.numpy())
        self.phase = "selected"

    def _rescore(self, state: DataState) -> None:
        """Online mode: the pool re-scored at the current parameters and moments alone (one
        checkpoint), and the top keep_fraction re-selected from the next draw on."""
        r = (state.step - self.warmup_steps) // self.rescore_every
        cos = self.checkpoint_cosines(state, self.num_checkpoints + r - 1, state.step, self._lr(state))
        self.scores, self.per_subtask = aggregate(cos.unsqueeze(0), [1.0])
        keep = top_fraction(self.scores, self.keep_fraction)
        self.kept_ids = torch.nonzero(keep).flatten()
        self._apply_keep(state, keep)
        state.metrics["selector/rescored"] = 1

    def _apply_keep(self, state: DataState, keep: torch.Tensor) -> None:
        self.pool_counts = keep_pool(state, keep)

    def _load_selection(self, state: DataState) -> None:
        saved = json.loads(Path(self.selection).read_text())
        N = sum(state.domain_sizes)
        ids = torch.as_tensor(saved["sample_ids"], dtype=torch.long)
        if len(ids) == 0 or int(ids.max()) >= N or int(ids.min()) < 0:
            raise ValueError(f"selector.selection={self.selection}: sample ids must lie in [0, {N}) (the pool of "
                             "this run's data config)")
        keep = torch.zeros(N, dtype=torch.bool)
        keep[ids] = True
        self.kept_ids = torch.nonzero(keep).flatten()
        self._apply_keep(state, keep)
        self.phase = "selected"
        if self.warmup_steps is None:
            self.warmup_steps = 0                    # rescore_every counts from the first step

    def exports(self, state: DataState) -> dict:
        if self.kept_ids is None:
            return {}
        out = {"sample_ids": self.kept_ids.tolist(),
               "kept_per_domain": dict(zip(state.domains, self.pool_counts)),
               "keep_fraction": self.keep_fraction, "target": self.target, "subtasks": self.subtask_names}
        if self.scores is not None:
            out.update({"scores": self.scores[self.kept_ids].tolist(),
                        "scores_per_subtask": self.per_subtask[self.kept_ids].tolist(),
                        "checkpoint_steps": self.checkpoint_steps, "mean_lr": self.mean_lrs(),
                        "checkpoint_weights": checkpoint_weights(self.mean_lrs()).tolist(),
                        "projector": self._describe(), "feature": self.feature, "params": self.params,
                        **self.optim_meta, "features_dir": self.features_dir})
        else:
            out["selection"] = self.selection
        return {"less_selection.json": out}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"phase": self.phase, "warmup_steps": self.warmup_steps, "checkpoint_steps": list(self.checkpoint_steps),
                "lr_sum": list(self.lr_sum), "lr_count": list(self.lr_count),
                "per_checkpoint": [t.clone() for t in self.per_checkpoint],
                "scores": self.scores, "per_subtask": self.per_subtask, "kept_ids": self.kept_ids,
                "pool_counts": self.pool_counts, "subtask_names": list(self.subtask_names),
                "optim_meta": dict(self.optim_meta)}

    def load_state_dict(self, sd: dict) -> None:
        self.phase, self.warmup_steps = sd["phase"], sd["warmup_steps"]
        self.checkpoint_steps, self.lr_sum, self.lr_count = list(sd["checkpoint_steps"]), list(sd["lr_sum"]), \
            list(sd["lr_count"])
        self.per_checkpoint = [t.clone() for t in sd["per_checkpoint"]]
        self.scores, self.per_subtask, self.kept_ids = sd["scores"], sd["per_subtask"], sd["kept_ids"]
        self.pool_counts, self.subtask_names = sd["pool_counts"], list(sd["subtask_names"])
        self.optim_meta = dict(sd["optim_meta"])
