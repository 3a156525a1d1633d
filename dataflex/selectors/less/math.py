"""LESS's arithmetic (Xia et al., ICML 2024; spec section 1), pure tensor functions with no state: the
Adam feature, L2 normalisation, cosines per target subtask, learning-rate-weighted aggregation over
checkpoints and the max over subtasks (`aggregate`, `less_scores`), the top-fraction mask, and the choice
of projector the features go through. The plugin (plugin.py) and the feature store (features.py) call
these; nothing here reads the data state or the disk."""
from __future__ import annotations

from typing import Sequence

import torch

from dataflex.grad.projection import RademacherProjector, SparseProjector

PROJECTORS = ("sparse", "rademacher", "none")
FEATURES = ("adam", "sgd")


def adam_feature(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, betas: Sequence[float],
                 eps: float) -> torch.Tensor:
    """LESS's Adam feature m' / sqrt(v' + eps) with m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2
    (eps inside the square root, no bias correction); g is [B, P] against [P] moments, or any
    shapes that broadcast."""
    b1, b2 = betas
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * g * g
    return m / torch.sqrt(v + eps)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def subtask_matrix(subtask: torch.Tensor, num_subtasks: int) -> torch.Tensor:
    """[M, J] averaging matrix: column j is 1/|subtask j| on its members (sizes may differ)."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(subtask).long(), num_subtasks).double()
    return onehot / onehot.sum(0, keepdim=True).clamp(min=1)


def subtask_cosines(train: torch.Tensor, target: torch.Tensor, subtask: torch.Tensor, num_subtasks: int,
                    normalize: bool = True) -> torch.Tensor:
    """[N, J]: mean over each subtask's target samples of cos(train_n, target_m) (the raw inner
    product with normalize=False)."""
    if normalize:
        train, target = l2_normalize(train.double()), l2_normalize(target.double())
    return (train.double() @ target.double().T) @ subtask_matrix(subtask, num_subtasks)


def checkpoint_weights(lrs: Sequence[float]) -> torch.Tensor:
    """eta_bar: each checkpoint's (mean) learning rate, renormalised to sum to 1 (uniform if all 0)."""
    lr = torch.as_tensor(lrs, dtype=torch.float64)
    return lr / lr.sum() if lr.sum() > 0 else torch.full_like(lr, 1.0 / len(lr))


def aggregate(per_checkpoint: torch.Tensor, lrs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, N, J] per-checkpoint subtask mean cosines -> (S [N] = max_j sum_i eta_i cos_i[:, j], the
    per-subtask scores [N, J])."""
    eta = checkpoint_weights(lrs)
    per_subtask = torch.einsum("c,cnj->nj", eta, per_checkpoint.double())
    return per_subtask.max(1).values, per_subtask


def less_scores(train: Sequence[torch.Tensor], target: Sequence[torch.Tensor], subtask: torch.Tensor,
                lrs: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """The pure LESS score from per-checkpoint features: train[i] [N, d], target[i] [M, d], `subtask`
    [M] the target samples' subtask, `lrs` the checkpoints' learning rates."""
    J = int(torch.as_tensor(subtask).max()) + 1
    cos = torch.stack([subtask_cosines(a, b, subtask, J, normalize) for a, b in zip(train, target)])
    return aggregate(cos, lrs)[0]


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool mask of the top `fraction` (at least 1) by score; ties go to the lower index."""
    k = max(1, round(fraction * len(scores)))
    order = torch.argsort(-scores.double(), stable=True)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def make_projector(kind: str, dim: int, seed: int):
    if kind == "sparse":
        return SparseProjector(dim, seed=seed)
    if kind == "rademacher":
        return RademacherProjector(dim, seed=seed)
    if kind == "none":
        return None
    raise ValueError(f"selector.projector must be one of {PROJECTORS}, got {kind!r}")
