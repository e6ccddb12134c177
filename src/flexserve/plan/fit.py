"""A sim profile fitted to a real engine's measured steps, for the planner.

Each measurement is one engine step: the tokens it computed (decodes, one
each, plus prefill chunk tokens), the KV-cache tokens its sequences held,
and the seconds it took. The sim engine's calibrated step-time model
(``StepTimeModel.step_time``) is linear in its four costs,

    seconds = t1·(1 − u) + t128·u + a·max(0, tokens − 128) + c·kv,
    u = (min(max(tokens, 1), 128) − 1) / 127,

so they are found by least squares (the normal equations, solved here
without numpy, which only the embedded extra brings). The steps should span
small and large batches and short and long contexts; the fit reports its
RMS error so that a poor fit shows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from flexserve.engines.sim.profiles import PROFILES, SimProfile


@dataclass(frozen=True)
class Fitted:
    profile: SimProfile
    num_steps: int
    rms_seconds: float
    source: str

    def describe(self) -> str:
        p = self.profile
        return (f"fitted to {self.num_steps} measured steps ({self.source}): {p.t1 * 1000:.2f} ms for one "
                f"token, {p.t128 * 1000:.2f} ms for 128, {p.a * 1e6:.2f} us per token beyond, "
                f"{p.c * 1e9:.3f} ns per KV token; RMS error {self.rms_seconds * 1000:.3f} ms")


def _row(tokens: int, kv: int) -> list[float]:
    u = (min(max(tokens, 1), 128) - 1) / 127
    return [1 - u, u, max(0, tokens - 128), kv]


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; ValueError if singular."""
    n = len(vector)
    m = [row[:] + [vector[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            raise ValueError("the steps do not tell the costs apart: measure small and large batches, "
                             "short and long contexts")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            factor = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= factor * m[col][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][k] * out[k] for k in range(r + 1, n))) / m[r][r]
    return out


def fit_steps(steps: list[tuple[int, int, float]], base: SimProfile, name: str = "fitted",
              source: str = "") -> Fitted:
    """``base`` with its step costs fitted to ``steps`` (tokens, kv tokens, seconds)."""
    if len(steps) < 4:
        raise ValueError(f"{len(steps)} steps: at least 4 are needed to fit 4 costs")
    rows = [_row(tokens, kv) for tokens, kv, _ in steps]
    # Columns scaled to comparable sizes, so that the normal equations stay well conditioned.
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(4)]
    scaled = [[r[j] / scale[j] for j in range(4)] for r in rows]
    gram = [[sum(r[i] * r[j] for r in scaled) for j in range(4)] for i in range(4)]
    moment = [sum(r[i] * s for r, (_, _, s) in zip(scaled, steps, strict=True)) for i in range(4)]
    t1, t128, a, c = (value / scale[j] for j, value in enumerate(_solve(gram, moment)))
    if min(t1, t128) <= 0 or a < 0 or c < 0:
        raise ValueError(f"the fit gives no engine (t1 {t1:.4g} s, t128 {t128:.4g} s, a {a:.3g}, c {c:.3g}): "
                         "the steps are too few or too noisy")
    residuals = [t1 * r[0] + t128 * r[1] + a * r[2] + c * r[3] - s for r, (_, _, s) in zip(rows, steps, strict=True)]
    rms = math.sqrt(sum(e * e for e in residuals) / len(residuals))
    profile = dataclasses.replace(base, name=name, t0=t1, a=a, c=c, t1=t1, t128=t128)
    return Fitted(profile, len(steps), rms, source)


def read_steps(path: Path) -> list[tuple[int, int, float]]:
    """JSONL, one step a line: ``{"step_tokens": N, "kv_tokens": K, "seconds": S}``."""
    steps = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            steps.append((int(row["step_tokens"]), int(row["kv_tokens"]), float(row["seconds"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a step line ({exc})") from exc
    return steps


def fitted_profile(path: Path, base: str) -> Fitted:
    """A profile fitted to the steps in ``path``; batch size limits and KV
    capacity are ``base``'s (a sim profile's name)."""
    return fit_steps(read_steps(path), PROFILES[base], f"fitted-{path.stem}", path.name)
