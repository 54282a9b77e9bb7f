"""Power-function averages as weightings of the training steps; the least squares of post-hoc EMA (torch only).

A power-function average (`hf_ema.rules.PowerFunction`) updated at optimizer steps `t_1 < ... < t_N` after the start
is a fixed linear combination of the training weights at those updates; so is every snapshot of it and every average
asked for after training. `PowerProfiles` gives the inner products of such weightings in closed form, and
`LeastSquares` the least-squares combination of snapshots closest to a requested one (EDM2's post-hoc EMA,
solved in the discrete setting rather than with EDM2's continuous approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

RCOND = 1e-13
"""Eigenvalues of the normal equations below this fraction of the largest are dropped (`LeastSquares`)."""


# ---- the update times ----


def append_update(segments: list[list[int]], step: int) -> None:
    """Adds one update step to `[first, count, stride]` runs (one run for an update every k steps)."""
    if segments:
        first, count, stride = segments[-1]
        if count == 1 and step > first:
            segments[-1] = [first, 2, step - first]
            return
        if first + stride * count == step:
            segments[-1][1] = count + 1
            return
    segments.append([step, 1, 0])


def expand_updates(segments: Sequence[Sequence[int]]) -> Tensor:
    """The optimizer steps of every update, from `[first, count, stride]` runs, as an int64 tensor."""
    parts = [first + stride * torch.arange(count, dtype=torch.int64) for first, count, stride in segments]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


# ---- the least-squares problem ----


class PowerProfiles:
    """The weights that power-function averages give the training weights at the updates.

    With updates at `t_1 < ... < t_N` optimizer steps after the start, the power-function average with exponent
    `gamma` after update `n` is `sum_{j<=n} w_j (t_j ** (g+1) - t_(j-1) ** (g+1)) / t_n ** (g+1)` (`t_0 = 0`; the
    start value has weight 0): the rule `s = (1 - elapsed / t) ** (g + 1)` unrolled. A profile is such a column of
    weights; `inner` gives the dot products of profiles in closed form from one cumulative sum per pair of
    exponents, so the normal equations cost O(N) per pair plus O(1) per entry, whatever N.

    Computed in float64 logarithms relative to `t_N`, so that exponents in the hundreds neither overflow nor lose the
    small differences between consecutive powers.

    Args:
        times (`Tensor`): `t_1 .. t_N`, optimizer steps since the start of each update, increasing and positive.
    """

    def __init__(self, times: Tensor) -> None:
        times = times.to(torch.float64)
        if times.numel() == 0 or bool((times <= 0).any()) or bool((times[1:] <= times[:-1]).any()):
            raise ValueError("update times must be positive and increasing")
        previous = torch.cat([times.new_zeros(1), times[:-1]])
        self.size = times.numel()
        self.log_t = torch.log(times / times[-1])
        self._log_ratio = torch.log(previous / times)  # -inf for the first update
        self._increments: dict[float, Tensor] = {}
        self._cumulative: dict[tuple, Tensor] = {}

    def log_increments(self, gamma: float) -> Tensor:
        """`log(t_j ** (g+1) - t_(j-1) ** (g+1))`, times relative to `t_N`."""
        if gamma not in self._increments:
            e = gamma + 1.0
            self._increments[gamma] = e * self.log_t + torch.log(-torch.expm1(e * self._log_ratio))
        return self._increments[gamma]

    def _cumulative_sum(self, key: tuple, terms) -> Tensor:
        if key not in self._cumulative:
            self._cumulative[key] = torch.logcumsumexp(terms(), dim=0)
        return self._cumulative[key]

    def inner(self, a: Sequence[tuple[int, float]], b: Sequence[tuple[int, float]]) -> Tensor:
        """Dot products of the profiles `a` and `b`, each `(n, gamma)`: update count and exponent."""
        out = torch.empty(len(a), len(b), dtype=torch.float64)
        na = torch.tensor([n for n, _ in a], dtype=torch.int64)
        nb = torch.tensor([n for n, _ in b], dtype=torch.int64)
        for ga in sorted({g for _, g in a}):
            ia = torch.tensor([i for i, (_, g) in enumerate(a) if g == ga], dtype=torch.int64)
            for gb in sorted({g for _, g in b}):
                ib = torch.tensor([i for i, (_, g) in enumerate(b) if g == gb], dtype=torch.int64)
                pair = (min(ga, gb), max(ga, gb))
                cumulative = self._cumulative_sum(
                    ("inner", *pair), lambda pair=pair: self.log_increments(pair[0]) + self.log_increments(pair[1])
                )
                n_a, n_b = na[ia][:, None], nb[ib][None, :]
                log = cumulative[torch.minimum(n_a, n_b) - 1]
                log = log - (ga + 1.0) * self.log_t[n_a - 1] - (gb + 1.0) * self.log_t[n_b - 1]
                out[ia[:, None], ib[None, :]] = torch.exp(log)
        return out

    def mean_time(self, columns: Sequence[tuple[int, float]]) -> Tensor:
        """The weighted mean update time of each profile, relative to `t_N` (its first moment)."""
        out = torch.empty(len(columns), dtype=torch.float64)
        for i, (n, gamma) in enumerate(columns):
            cumulative = self._cumulative_sum(("mean", gamma), lambda g=gamma: self.log_increments(g) + self.log_t)
            out[i] = torch.exp(cumulative[n - 1] - (gamma + 1.0) * self.log_t[n - 1])
        return out

    def dense(self, n: int, gamma: float) -> Tensor:
        """One profile as a length-N vector (for tests and small problems)."""
        out = torch.zeros(self.size, dtype=torch.float64)
        out[:n] = torch.exp(self.log_increments(gamma)[:n] - (gamma + 1.0) * self.log_t[n - 1])
        return out


class LeastSquares:
    """Least-squares combinations of fixed profiles (the snapshots' averages) closest to requested ones.

    For a target profile `q` it finds `x` minimising `||P x - q||` (the L2 distance of the weightings over the
    updates), subject to `sum(x) = 1` (every profile sums to 1, so weights that never moved come back exactly) and to
    `P x` having the target's mean update time (so a steady drift of the weights comes back exactly too). It works on
    the null space of those two constraints, through the eigenvectors of the normal equations, dropping directions
    whose eigenvalue is below `RCOND` of the largest: near-duplicate snapshots then cannot produce huge cancelling
    coefficients. The factorisation depends on the columns only; each `solve` costs two matrix-vector products.

    Args:
        profiles (`PowerProfiles`): the updates.
        columns (`Sequence[tuple[int, float]]`): `(n, gamma)` of each snapshot average.
    """

    def __init__(self, profiles: PowerProfiles, columns: Sequence[tuple[int, float]]) -> None:
        self.profiles, self.columns = profiles, list(columns)
        self.gram = profiles.inner(self.columns, self.columns)
        self.constraints = torch.stack(
            [torch.ones(len(self.columns), dtype=torch.float64), profiles.mean_time(columns)]
        )
        self._pinv = torch.linalg.pinv(self.constraints)
        _, singular, vh = torch.linalg.svd(self.constraints)
        self._null = vh[int((singular > 1e-12 * singular.max()).sum()) :].T
        eigenvalues, vectors = torch.linalg.eigh(self._null.T @ self.gram @ self._null)
        keep = eigenvalues > RCOND * eigenvalues.max().clamp_min(0) if eigenvalues.numel() else eigenvalues > 0
        self._vectors, self._eigenvalues = vectors[:, keep], eigenvalues[keep]

    def solve(self, target: tuple[int, float]) -> tuple[Tensor, float]:
        """Coefficients for the target profile `(n, gamma)`.

        Returns:
            `(x, residual)`: float64 coefficients, and the relative L2 error of the synthesised weighting,
            `||P x - q|| / ||q||`.
        """
        rhs = self.profiles.inner(self.columns, [target])[:, 0]
        norm2 = float(self.profiles.inner([target], [target])[0, 0])
        values = torch.tensor([1.0, float(self.profiles.mean_time([target])[0])], dtype=torch.float64)
        x = self._pinv @ values
        if self._eigenvalues.numel():
            projected = self._vectors.T @ (self._null.T @ (rhs - self.gram @ x))
            x = x + self._null @ (self._vectors @ (projected / self._eigenvalues))
        error2 = norm2 - 2.0 * float(x @ rhs) + float(x @ self.gram @ x)
        return x, math.sqrt(max(error2, 0.0) / norm2)
