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

Who does what: this class is the schedule (warm-up pool, checkpoint steps and their mean learning
rates, selection, re-scoring, exports, state_dict); features.py computes the features through
state.signals and keeps them on disk (`features_dir`, `selection`); math.py holds the arithmetic.

Deviations: the warm-up set is a random `warmup_fraction` of every domain, drawn per domain (each
domain contributes the same share; LESS draws its 5% from the pooled training data, so each domain's
share of the warm-up set is only its share of the pool in expectation). The live run is the warm-up
model (LESS trains a separate LoRA warm-up model, then the target model from scratch on the
selection: here training continues from the warm-up weights; with `model.lora_rank` the run trains
whatever its optimizer holds, LoRA adapters and base weights alike, while the features use the
adapters). On several ranks the warm-up fraction, the target
features and the moments are the same on every rank; each rank computes the features of its
contiguous slice of every chunk of `chunk_size` x ranks pool samples, and the cosines (with
`features_dir`, the features too) are gathered, so every rank selects the same samples. Under
DeepSpeed ZeRO 1/2 or bf16, the moments are assembled by DeepSpeed's `safe_get_full_optimizer_state`
(see Signals.optimizer_state).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Selector
from dataflex.core.state import DataState, keep_pool
from dataflex.selectors.less.features import LessFeatures, load_selection, save_scores
from dataflex.selectors.less.math import FEATURES, aggregate, checkpoint_weights, make_projector, top_fraction
from dataflex.utils import dist


def _offsets(sizes) -> list:
    """The first global id of each domain."""
    out = [0]
    for n in sizes[:-1]:
        out.append(out[-1] + n)
    return out


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
        self.projector = make_projector(projector, dim, projector_seed)       # validates
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
        self.featurizer = LessFeatures(self.target, self.params, feature, self.projector, dim, target_samples,
                                       chunk_size, features_dir, progress)
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
        if steps is None and getattr(state, "packing", False):
            # packed rows: a step trains rows x seq_len token slots, so epochs count the pool's label tokens
            pool = torch.cat([off + torch.nonzero(state.pool_masks[d]).flatten()
                              for d, off in enumerate(_offsets(state.domain_sizes))])
            tokens = int(state.signals.sample_tokens(pool).sum())
            steps = math.ceil(self.warmup_epochs * tokens / (state.global_batch_size * state.signals.seq_len))
        elif steps is None:
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
        (launch/score.py after a crash). The work is LessFeatures.checkpoint_cosines'."""
        out, self.subtask_names, self.optim_meta = self.featurizer.checkpoint_cosines(
            state, i, step, lr, pool_ids, of=self.num_checkpoints, optim_meta=self.optim_meta)
        return out

    # -- selection -------------------------------------------------------------------------------
    def mean_lrs(self) -> list:
        return [s / max(1, c) for s, c in zip(self.lr_sum, self.lr_count)]

    def _select(self, state: DataState) -> None:
        self.scores, self.per_subtask = aggregate(torch.stack(self.per_checkpoint), self.mean_lrs())
        self._apply_keep(state, top_fraction(self.scores, self.keep_fraction))
        if self.features_dir and dist.rank() == 0:
            save_scores(self.features_dir, self.scores, self.per_subtask)
        self.phase = "selected"

    def _rescore(self, state: DataState) -> None:
        """Online mode: the pool re-scored at the current parameters and moments alone (one
        checkpoint), and the top keep_fraction re-selected from the next draw on."""
        r = (state.step - self.warmup_steps) // self.rescore_every
        cos = self.checkpoint_cosines(state, self.num_checkpoints + r - 1, state.step, self._lr(state))
        self.scores, self.per_subtask = aggregate(cos.unsqueeze(0), [1.0])
        self._apply_keep(state, top_fraction(self.scores, self.keep_fraction))
        state.metrics["selector/rescored"] = 1

    def _apply_keep(self, state: DataState, keep: torch.Tensor) -> None:
        self.kept_ids = torch.nonzero(keep).flatten()
        self.pool_counts = keep_pool(state, keep)

    def _load_selection(self, state: DataState) -> None:
        self._apply_keep(state, load_selection(self.selection, sum(state.domain_sizes)))
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
                        "projector": self.featurizer.describe(), "feature": self.feature, "params": self.params,
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
