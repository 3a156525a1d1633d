"""RegMix: data mixture as regression (Liu et al., ICLR 2025), the offline workflow's pure parts, as the
reference code `sail-sg/regmix` does them.

Not an online mixer: it picks one static mixture from many short proxy runs
(`launch/regmix.py` drives the whole of it; the result trains with `+mixer=static mixer.weights=PATH`).

1. Sample the proxy mixtures (`mixture_config/synthesize_mixture.py`, `sample_mixtures`). With s the
   raw token shares (normalised) and p~ = s ** 0.5 renormalised (the temperature prior):
   - draw `multiplier` (100) x n candidates w ~ Dirichlet(c p~), the concentration c drawn uniformly
     from the 15 values logspace(log10 0.1, log10 5, 15) (`concentration_grid`);
   - reject a candidate with any w_i > min(15 s_i, 1): the 15x bound is on the RAW share s, not p~;
   - in the rest, set every w_i < 2e-4 to ZERO (not a rejection), renormalise, and round to multiples
     of 2e-4 (so a mixture sums to 1 within K x 1e-4) (`regmix_filter`);
   - drop near-identical mixtures (L1 <= 1e-5 after a lexicographic sort) and draw n of the rest
     without replacement.
   Where fewer than n are left, more candidates are drawn (`max_rounds` times) before failing with the
   acceptance rate of the 15x bound, the only rule that rejects.
2. Train one short proxy run per mixture (a Hydra sweep of `+mixer=static mixer.weights=FILE`).
3. Regress the target validation loss on the mixture: LightGBM (gbdt, learning rate 1e-2, 1000
   rounds, early stopping 3) where installed, a linear model otherwise. The held-out Spearman rank
   correlation of out-of-fold predictions gates the result (`regression_problem`): `launch/regmix.py`
   writes no mixture from a regression that does not rank held-out runs clearly better than chance.
4. Predict the loss of 100k candidates drawn as PLAIN Dirichlet(1 x s) samples (the raw shares,
   concentration 1, no bound, no rounding: `regression.ipynb`) and output the mean of the top 128
   (lowest predicted loss) (`candidate_mixtures`, `top_k_mixture`).

The random streams are numpy Generators seeded from `seed`, not the reference's global
`np.random`/`random` state, so the same seed gives other (equally distributed) mixtures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MIN_STRENGTH, MAX_STRENGTH, N_STRENGTHS = 0.1, 5.0, 15      # the reference's MIN_STRENGH, MAX_STRENGH
MAX_USAGE = 15.0                                            # MAXIMUM_USAGE: w_i <= 15 x raw share
MINIMUM = 2e-4                                              # weights below it are set to zero
MULTIPLIER = 100                                            # SAMPLE_MULTIPLIER: candidates per mixture
MIN_SPEARMAN = 0.3                                          # the held-out rank correlation a fit must reach


def shares_of(sizes: Sequence[float]) -> np.ndarray:
    s = np.asarray(sizes, dtype=np.float64)
    if s.ndim != 1 or len(s) < 2 or (s < 0).any() or not s.sum() > 0:
        raise ValueError(f"regmix needs >= 2 non-negative domain sizes with a positive sum, got {sizes!r}")
    return s / s.sum()


def temperature_prior(sizes: Sequence[float], temperature: float = 0.5) -> np.ndarray:
    """p~ = share ** temperature, renormalised (the reference applies it for temperature < 1)."""
    p = shares_of(sizes) ** temperature
    return p / p.sum()


def concentration_grid(min_strength: float = MIN_STRENGTH, max_strength: float = MAX_STRENGTH,
                       n: int = N_STRENGTHS) -> np.ndarray:
    """The reference's Dirichlet concentrations: n log-spaced values from min to max strength."""
    if min_strength == max_strength:
        return np.array([float(min_strength)])
    return np.logspace(math.log10(min_strength), math.log10(max_strength), n)


def dirichlet_draws(prior: np.ndarray, strengths: np.ndarray, m: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """([m, K] draws of Dirichlet(c p~), [m] their c), c uniform over `strengths` per draw (the
    reference draws one mixture per strength and keeps one of them at random: the same law)."""
    prior = np.asarray(prior, dtype=np.float64)
    pick = rng.integers(len(strengths), size=m)
    out = np.empty((m, len(prior)))
    for j, c in enumerate(strengths):
        rows = np.flatnonzero(pick == j)
        if len(rows):
            out[rows] = rng.dirichlet(prior * c, size=len(rows))
    return out, np.asarray(strengths, dtype=np.float64)[pick]


def regmix_filter(raw: np.ndarray, sizes: Sequence[float], max_usage: float = MAX_USAGE,
                  minimum: float = MINIMUM) -> tuple[np.ndarray, np.ndarray]:
    """The reference's rules on candidate mixtures `raw` [m, K]: ([m] bool accepted, [a, K] the accepted
    ones post-processed). Rejected: any w_i outside [0, min(max_usage x share_i, 1)] with share_i the
    RAW (untempered) share. Accepted ones: w_i < minimum set to 0, renormalised, rounded to multiples
    of `minimum`."""
    raw = np.asarray(raw, dtype=np.float64)
    bound = np.minimum(shares_of(sizes) * max_usage, 1.0)
    ok = ((raw >= 0) & (raw <= bound[None])).all(1)
    w = np.where(raw[ok] < minimum, 0.0, raw[ok])
    total = w.sum(1, keepdims=True)
    alive = total[:, 0] > 0                       # every weight below the minimum: nothing to keep
    ok[np.flatnonzero(ok)[~alive]] = False
    w = w[alive] / total[alive]
    return ok, np.round(w / minimum) * minimum


def deduplicate(mixtures: np.ndarray, threshold: float = 1e-5) -> np.ndarray:
    """Rows in lexicographic order (last column first, as np.lexsort), each kept only if its L1 distance
    to the last kept row exceeds `threshold` (the reference's sort_and_deduplicate)."""
    arr = np.asarray(mixtures, dtype=np.float64)
    if len(arr) == 0:
        return arr
    arr = arr[np.lexsort(arr.T)]
    keep = [0]
    for i in range(1, len(arr)):
        if np.abs(arr[i] - arr[keep[-1]]).sum() > threshold:
            keep.append(i)
    return arr[keep]


def sample_mixtures(sizes: Sequence[float], n: int, seed: int = 0, temperature: float = 0.5,
                    strengths: Optional[Sequence[float]] = None, max_usage: float = MAX_USAGE,
                    minimum: float = MINIMUM, multiplier: int = MULTIPLIER, max_rounds: int = 20) -> np.ndarray:
    """[n, K] proxy mixtures by the reference's rules (module docstring, step 1). `sizes`: the domains'
    token counts or shares (raw, untempered)."""
    shares = shares_of(sizes)
    prior = temperature_prior(shares, temperature) if temperature < 1.0 else shares
    strengths = concentration_grid() if strengths is None else np.asarray(strengths, dtype=np.float64)
    rng = np.random.default_rng(seed)
    kept, drawn, accepted = [], 0, 0
    unique = np.empty((0, len(shares)))
    for _ in range(max_rounds):
        m = max(n * multiplier, 1)
        raw, _ = dirichlet_draws(prior, strengths, m, rng)
        ok, mixtures = regmix_filter(raw, shares, max_usage, minimum)
        drawn, accepted = drawn + m, accepted + int(ok.sum())
        kept.append(mixtures)
        unique = deduplicate(np.concatenate(kept))
        if len(unique) >= n:
            return unique[rng.choice(len(unique), n, replace=False)]
    raise RuntimeError(
        f"regmix: {accepted} of {drawn} candidate mixtures ({accepted / drawn:.3%}) are within the bound "
        f"w_i <= {max_usage:g} x raw share_i, and {len(unique)} distinct ones are left, fewer than the {n} "
        f"asked: raise max_usage or ask for fewer mixtures")


def candidate_mixtures(sizes: Sequence[float], n: int, seed: int = 0, strength: float = 1.0) -> np.ndarray:
    """[n, K] plain Dirichlet(strength x raw shares) samples: the reference's 100k prediction candidates
    (no temperature, no bound, no rounding)."""
    return np.random.default_rng(seed).dirichlet(shares_of(sizes) * strength, size=n)


class LinearModel:
    """Least squares on [w, 1] (the mixture weights sum to 1, so the intercept is absorbed by lstsq)."""
    name = "linear"

    def fit(self, X, y):
        A = np.concatenate([X, np.ones((len(X), 1))], 1)
        self.coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        return self

    def predict(self, X):
        return np.concatenate([X, np.ones((len(X), 1))], 1) @ self.coef


class LightGBMModel:
    """RegMix's regressor: gbdt, learning rate 1e-2, 1000 rounds, early stopping 3 on a held-out fifth."""
    name = "lightgbm"

    def __init__(self, seed: int = 0, rounds: int = 1000, early_stopping: int = 3):
        self.seed, self.rounds, self.early_stopping = seed, rounds, early_stopping

    def fit(self, X, y):
        import lightgbm as lgb

        n = len(X)
        rng = np.random.default_rng(self.seed)
        idx = rng.permutation(n)
        n_val = max(1, n // 5) if n >= 10 else 0
        val, train = idx[:n_val], idx[n_val:]
        params = {"objective": "regression", "boosting_type": "gbdt", "learning_rate": 1e-2, "verbose": -1,
                  "seed": self.seed, "min_data_in_leaf": max(1, min(20, len(train) // 10)),
                  "min_data_in_bin": 1, "num_threads": 1, "deterministic": True}
        dtrain = lgb.Dataset(X[train], y[train], params={"min_data_in_bin": 1})
        callbacks, valid = [], []
        if n_val:
            valid = [lgb.Dataset(X[val], y[val], reference=dtrain)]
            callbacks = [lgb.early_stopping(self.early_stopping, verbose=False)]
        self.booster = lgb.train(params, dtrain, num_boost_round=self.rounds, valid_sets=valid, callbacks=callbacks)
        return self

    def predict(self, X):
        return self.booster.predict(X, num_iteration=self.booster.best_iteration or None)


def make_model(kind: str = "auto", seed: int = 0):
    if kind == "auto":
        try:
            import lightgbm  # noqa: F401
            kind = "lightgbm"
        except ImportError:
            kind = "linear"
    if kind == "lightgbm":
        return LightGBMModel(seed)
    if kind == "linear":
        return LinearModel()
    raise ValueError(f"regmix model must be auto, lightgbm or linear, got {kind!r}")


def fit_regression(X: np.ndarray, y: np.ndarray, kind: str = "auto", seed: int = 0):
    return make_model(kind, seed).fit(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def heldout_spearman(X, y, kind: str = "auto", folds: int = 5, seed: int = 0) -> Optional[float]:
    """Spearman correlation of out-of-fold predictions with the measured losses (None below 2 folds' data)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(X)
    folds = min(folds, n)
    if folds < 2 or n < 4:
        return None
    idx = np.random.default_rng(seed).permutation(n)
    pred = np.empty(n)
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        pred[test] = fit_regression(X[train], y[train], kind, seed).predict(X[test])
    return spearman(pred, y)


def regression_problem(rho: Optional[float], min_spearman: float = MIN_SPEARMAN) -> Optional[str]:
    """Why a regression with held-out Spearman `rho` must not pick a mixture, or None when it may: the
    top of its predictions is only worth more than a random mixture if it ranks runs it was not fitted
    on clearly better than chance."""
    if rho is None:
        return ("the regression's held-out Spearman rank correlation cannot be measured (fewer than 4 "
                "proxy runs), so nothing shows that its predicted best mixture beats a random one")
    if not np.isfinite(rho):
        return ("the regression's held-out Spearman rank correlation is undefined (constant predictions "
                "or losses): it does not rank the proxy runs at all")
    if rho < min_spearman:
        return (f"the regression's held-out Spearman rank correlation is {rho:.3f}, below {min_spearman:g}: "
                f"it ranks proxy runs it was not fitted on {'worse than' if rho <= 0 else 'barely better than'} "
                f"chance, so its predicted best mixture is noise (more or longer proxy runs, or another "
                f"--target, may help)")
    return None


def top_k_mixture(model, sizes: Sequence[float], n_candidates: int = 100_000, top_k: int = 128,
                  seed: int = 0) -> tuple[np.ndarray, float]:
    """(mean of the top_k of `n_candidates` plain Dirichlet(raw shares) candidates by predicted loss, the
    predicted loss of that mean)."""
    candidates = candidate_mixtures(sizes, n_candidates, seed=seed + 1)
    pred = model.predict(candidates)
    best = candidates[np.argsort(pred, kind="stable")[:top_k]].mean(0)
    return best, float(model.predict(best[None])[0])


def write_mixture(path, domains: Sequence[str], weights: np.ndarray, **info) -> Path:
    """A mixture file `+mixer=static mixer.weights=PATH` loads: {"weights": {domain: w}, ...info}
    (JSON, or YAML for a .yaml/.yml path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"weights": {d: float(w) for d, w in zip(domains, weights)}, **info}
    if path.suffix in (".yaml", ".yml"):
        import yaml
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    else:
        path.write_text(json.dumps(content, indent=2) + "\n")
    return path
