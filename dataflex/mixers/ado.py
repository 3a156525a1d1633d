"""ADO: Adaptive Data Optimization (Jiang, Zhou, Feng, Malladi, Kolter; ICLR 2025), the reference code's form.

Signal: each domain's training loss every step (mean over the batch's samples from it; a missing
domain reuses its last value) and the samples drawn per domain. No proxy, no validation set.

1. Per-domain power law L_k(n) = eps_k + beta_k n^(-alpha_k), with n the total samples seen (all
   domains: the code's use_same_step_size). Fitted every `update_interval` steps from `start_step` on:
   the loss series is smoothed (Savitzky-Golay, window 101, order 3) and subsampled every 10 steps;
   in log space, pred = logsumexp(log beta - alpha log n, log eps) against log L with a Huber loss
   (delta 1e-3) plus the soft penalties max(alpha - 0.8, 0) - min(alpha, 0.001) + max(log beta - 6.5, 0)
   - min(log eps - 0.5, 0); L-BFGS (200 iterations) from the 8x8x8 grid log beta in [-2, 6),
   log eps in [-2, 2), alpha in [0, 0.8); the best fit is kept. (Here L-BFGS starts from the
   `n_starts` grid points of lowest objective, all 512 with n_starts=0; scipy instead of jaxopt;
   among fits within the Huber threshold of the best, the smallest beta wins, so a flat series,
   which any eps + beta with alpha ~ 0 fits, reads as irreducible loss.)
2. Preference rho_k ∝ mu_k * h_k^0.5 * max(alpha_k, 0.05) (L_k(n) - eps_k) / n: the prior (token
   share) times the credit term times |dL_k/dn|. h is the EMA (gamma 0.9) of the realised share of
   each domain in the batch. The credit term sqrt(h) (`credit="h"`, the default) is the reference
   code's since its commit bc3d8d0 ("Fixing update rule to the correct version", 2024-12) and the
   spec's; `credit="h(1-h)"` is the superseded sqrt(h (1 - h)) of the code's first public release,
   kept only to reproduce runs made with it.
3. Floor: normalise, clip every probability to at least 0.01, rescale (the code's
   clip_min_probability).
4. Smoothing: p_t = 0.9 p_bar + 0.1 rho, then p_bar <- (1 - 1/(t+1)) p_bar + rho / (t+1).
5. Before `start_step`, or before the first valid fit, the prior mu is used.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Mixer
from dataflex.core.state import DataState
from dataflex.mixers.static import WeightSpec, resolve_weights

GRID_LOG_BETA = np.arange(-2, 6, 1.0)
GRID_LOG_EPS = np.arange(-2, 2, 0.5)
GRID_ALPHA = np.arange(0, 0.8, 0.1)
CREDITS = ("h", "h(1-h)")          # sqrt(h): the reference code's; sqrt(h (1 - h)): its superseded first form


def power_law(n, log_beta, log_eps, alpha):
    """eps + beta * n^-alpha (numpy broadcasting)."""
    return np.exp(log_eps) + np.exp(log_beta) / np.asarray(n, dtype=np.float64) ** alpha


def power_law_objective(params: np.ndarray, log_n: np.ndarray, log_loss: np.ndarray, delta: float = 1e-3,
                        penalties: tuple = (0.8, 6.5, 0.5)) -> tuple[np.ndarray, np.ndarray]:
    """ADO's fit objective and its gradient for a batch of parameter vectors [G, 3] =
    (log beta, log eps, alpha): Huber(log L - pred) summed over points, plus the soft penalties."""
    params = np.atleast_2d(params)
    a, e, al = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    x1 = a - al * log_n[None]
    pred = np.logaddexp(x1, e)
    s1 = np.exp(x1 - pred)                                    # d pred / d log beta
    r = pred - log_loss[None]
    absr = np.abs(r)
    value = np.where(absr > delta, delta * (absr - 0.5 * delta), 0.5 * r ** 2).sum(1)
    dr = np.clip(r, -delta, delta)
    grad = np.stack([(dr * s1).sum(1), (dr * (1 - s1)).sum(1), (dr * s1 * -log_n[None]).sum(1)], 1)
    alpha_max, log_beta_max, log_eps_min = penalties
    al, a, e = al[:, 0], a[:, 0], e[:, 0]
    value = value + np.maximum(al - alpha_max, 0) - np.minimum(al, 0.001) + np.maximum(a - log_beta_max, 0) \
        - np.minimum(e - log_eps_min, 0)
    grad[:, 2] += (al > alpha_max).astype(float) - (al < 0.001).astype(float)
    grad[:, 0] += (a > log_beta_max).astype(float)
    grad[:, 1] -= (e < log_eps_min).astype(float)
    return value, grad


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(1)
    except ImportError:
        import contextlib
        return contextlib.nullcontext()


def fit_power_law(n, losses, n_starts: int = 16, maxiter: int = 200, delta: float = 1e-3,
                  penalties: tuple = (0.8, 6.5, 0.5)) -> np.ndarray:
    """(log beta, log eps, alpha) of the best fit of L(n) = eps + beta n^-alpha, ADO's objective."""
    from scipy.optimize import minimize

    log_n = np.log(np.asarray(n, dtype=np.float64))
    log_loss = np.log(np.asarray(losses, dtype=np.float64))
    grid = np.stack(np.meshgrid(GRID_LOG_BETA, GRID_LOG_EPS, GRID_ALPHA, indexing="ij"), -1).reshape(-1, 3)
    values, _ = power_law_objective(grid, log_n, log_loss, delta, penalties)
    starts = grid[np.argsort(values, kind="stable")[:n_starts]] if n_starts else grid
    fits = []
    with _one_blas_thread():   # L-BFGS-B on 3 parameters: BLAS threads only spin (10x slower on a busy CPU)
        for x0 in starts:
            res = minimize(lambda p: tuple(v[0] for v in power_law_objective(p, log_n, log_loss, delta, penalties)),
                           x0, jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
            if np.all(np.isfinite(res.x)) and np.isfinite(res.fun):
                fits.append((float(res.fun), res.x))
    if not fits:
        return None
    best_value = min(v for v, _ in fits)
    # a flat series fits any eps + beta with alpha ~ 0: among equally good fits (every residual
    # within delta), take the smallest beta, i.e. read a flat loss as irreducible
    tied = [x for v, x in fits if v <= best_value + 0.5 * delta ** 2 * len(log_n)]
    return min(tied, key=lambda x: x[0])


def smooth_series(y: np.ndarray, window: int = 101, order: int = 3) -> np.ndarray:
    """Savitzky-Golay along the last axis, the window shrunk to the series (odd, > order)."""
    from scipy.signal import savgol_filter

    T = y.shape[-1]
    w = min(window, T if T % 2 else T - 1)
    if w <= order:
        return y
    return savgol_filter(y, w, order, axis=-1)


def clip_min_probability(p: torch.Tensor, floor: float) -> torch.Tensor:
    """ADO's floor: scale down to leave room for the deficit, clip at `floor`, renormalise."""
    p = torch.as_tensor(p, dtype=torch.float64)
    deficit = max(floor * len(p) - float(p.sum()), 0.0)
    scaled = p * (1 - deficit) / p.sum()
    clipped = scaled.clamp(min=floor)
    return clipped / clipped.sum()


def ado_preference(params: torch.Tensor, n, prior: torch.Tensor, history: torch.Tensor,
                   credit: str = "h", min_alpha: float = 0.05) -> torch.Tensor:
    """rho ∝ mu * credit(h) * max(alpha, 0.05) * (L(n) - eps) / n, normalised, before the floor. params:
    [K, 3] rows (log beta, log eps, alpha); credit(h) = sqrt(h) (`"h"`, the reference code's) or the
    superseded sqrt(h (1 - h)) (`"h(1-h)"`)."""
    if credit not in CREDITS:
        raise ValueError(f"ado credit must be one of {CREDITS}, got {credit!r}")
    params = torch.as_tensor(params, dtype=torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64)
    log_beta, log_eps, alpha = params[:, 0], params[:, 1], params[:, 2]
    reducible = torch.exp(log_beta) / n ** alpha                  # L(n) - eps
    slope = alpha.clamp(min=min_alpha) * reducible / n
    h = history.double()
    c = h.sqrt() if credit == "h" else (h * (1 - h)).sqrt()
    rho = prior.double() * c * slope
    if not torch.isfinite(rho).all() or rho.sum() <= 0:
        return prior.double() / prior.sum()
    return rho / rho.sum()


def ado_smooth(p_avg: torch.Tensor, rho: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_t, new p_bar): p_t = 0.9 p_bar + 0.1 rho; p_bar <- (1 - 1/(t+1)) p_bar + rho/(t+1)."""
    p = 0.9 * p_avg + 0.1 * rho
    return p, (1 - 1 / (t + 1)) * p_avg + rho / (t + 1)


class ADOMixer(Mixer):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"start_step": "[0, inf)", "update_interval": "[1, inf)", "ignore_steps": "[0, inf)",
                "gamma": "[0, 1)", "floor": "[0, 1)", "window": "[3, inf)", "order": "[0, inf)",
                "subsample": "[1, inf)", "huber_delta": "(0, inf)", "max_alpha": "(0, inf)",
                "n_starts": "[1, inf)", "maxiter": "[1, inf)", "credit": ('h', 'h(1-h)')}
    def __init__(self, start_step: int = 500, update_interval: int = 1000, ignore_steps: int = 0,
                 prior: WeightSpec = "size", gamma: float = 0.9, floor: float = 0.01, window: int = 101,
                 order: int = 3, subsample: int = 10, huber_delta: float = 1e-3, max_alpha: float = 0.8,
                 max_log_beta: float = 6.5, min_log_eps: float = 0.5, n_starts: int = 16, maxiter: int = 200,
                 credit: str = "h", same_step_size: bool = True):
        if credit not in CREDITS:
            raise ValueError(f"ado credit must be one of {CREDITS}, got {credit!r}")
        self.start_step, self.update_interval, self.ignore_steps = start_step, update_interval, ignore_steps
        self.prior_spec, self.gamma, self.floor = prior, gamma, floor
        self.window, self.order, self.subsample = window, order, subsample
        self.huber_delta, self.penalties = huber_delta, (max_alpha, max_log_beta, min_log_eps)
        self.n_starts, self.maxiter, self.credit, self.same_step_size = n_starts, maxiter, credit, same_step_size
        self.losses: list = []          # per step, [K] domain losses
        self.counts: list = []          # per step, [K] samples per domain
        self.params: Optional[torch.Tensor] = None
        self.history = self.p_avg = self.p = self.rho = None
        self.total: Optional[torch.Tensor] = None   # samples seen per domain

    def setup(self, state: DataState) -> None:
        self.prior = resolve_weights(self.prior_spec, state.domains, self.domain_sizes(state).tolist())
        if self.history is None:
            self.history, self.p_avg, self.p = self.prior.clone(), self.prior.clone(), self.prior.clone()

    def weights(self, state: DataState) -> torch.Tensor:
        if state.step < self.start_step or self.params is None:
            self.p = self.prior
            return self.p
        n = self.seen()
        self.rho = clip_min_probability(ado_preference(self.params, n, self.prior, self.history, self.credit),
                                        self.floor)
        self.p, self.p_avg = ado_smooth(self.p_avg, self.rho, state.step)
        return self.p

    def seen(self) -> torch.Tensor:
        """n per domain: total samples seen (same_step_size) or the domain's own count."""
        c = self.total.double()
        return c.sum().expand_as(c).clone() if self.same_step_size else c.clamp(min=1)

    def update(self, event: Event, state: DataState) -> None:
        if event != Event.BATCH_END:
            return
        K = state.num_domains
        counts = torch.bincount(state.batch_domains, minlength=K)
        means, present = state.domain_mean(state.losses, state.batch_domains)
        fallback = self.losses[-1] if self.losses else torch.full((K,), float(state.losses.double().mean()))
        self.losses.append(torch.where(present, means, fallback))
        self.counts.append(counts)
        self.total = counts.clone() if self.total is None else self.total + counts
        share = counts.double() / counts.sum()
        self.history = self.gamma * self.history + (1 - self.gamma) * share
        step = state.step
        if step >= self.start_step and step % self.update_interval == 0:
            self.refit()
        for d, name in enumerate(state.domains):
            state.metrics[f"ado/h/{name}"] = float(self.history[d])
            if self.params is not None:
                state.metrics[f"ado/alpha/{name}"] = float(self.params[d, 2])
                state.metrics[f"ado/eps/{name}"] = math.exp(float(self.params[d, 1]))
                state.metrics[f"ado/beta/{name}"] = math.exp(float(self.params[d, 0]))
            if self.rho is not None:
                state.metrics[f"ado/rho/{name}"] = float(self.rho[d])

    def refit(self) -> None:
        L = torch.stack(self.losses).double().numpy().T                      # [K, T]
        cum = torch.stack(self.counts).double().cumsum(0)                   # [T, K]
        n = (cum.sum(1, keepdim=True).expand_as(cum) if self.same_step_size else cum.clamp(min=1)).numpy().T
        L = smooth_series(L, self.window, self.order)[:, self.ignore_steps::self.subsample]
        n = n[:, self.ignore_steps::self.subsample]
        if L.shape[1] < 3 or not np.all(L > 0):
            return
        fits = [fit_power_law(n[k], L[k], self.n_starts, self.maxiter, self.huber_delta, self.penalties)
                for k in range(L.shape[0])]
        if all(f is not None for f in fits):
            self.params = torch.tensor(np.stack(fits), dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "counts": list(self.counts), "params": self.params,
                "history": self.history, "p_avg": self.p_avg, "p": self.p, "rho": self.rho}

    def load_state_dict(self, sd: dict) -> None:
        self.losses, self.counts = list(sd["losses"]), list(sd["counts"])
        self.total = torch.stack(self.counts).sum(0) if self.counts else None
        self.params, self.history, self.p_avg, self.p, self.rho = sd["params"], sd["history"], sd["p_avg"], \
            sd["p"], sd["rho"]
