"""How far apart two arrays are, in one vocabulary for every tool.

`array_diff(a, b)` answers "same bits?" first and then "how far?": the number of
elements whose bits differ, the largest absolute and relative difference, the largest
difference over the array's own scale, and the largest distance in units in the last
place (ULP) with a histogram. `jaxrepro.analysis.diff` (checkpoints, probes),
`jaxrepro.analysis.compare` (JAX against Keras) and `jaxrepro.analysis.variance` all
report `ArrayDiff`s. Rank statistics for heatmaps (`spearman`, `top_overlap`) live here
too. NumPy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# ULP-distance histogram bins: [lo, hi) each.
ULP_BINS = ((0, 1), (1, 2), (2, 4), (4, 16), (16, 256), (256, 65536), (65536, 2**63))
_SIGNED = {2: np.int16, 4: np.int32, 8: np.int64}


def ordered_bits(x: np.ndarray) -> np.ndarray:
    """IEEE float bit patterns as int64, so that adjacent floats differ by exactly 1.

    -0.0 and +0.0 both map to 0; a positive float keeps its pattern; a negative one
    maps to minus the pattern of its magnitude. Works for float16, float32, float64.
    """
    x = np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize not in _SIGNED:
        raise TypeError(f"ULP distance needs an IEEE float array, got {x.dtype}")
    bits = x.view(_SIGNED[x.dtype.itemsize]).astype(np.int64)
    magnitude = bits & np.int64(np.iinfo(_SIGNED[x.dtype.itemsize]).max)
    return np.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of representable floats between a and b, elementwise (int64).

    Both arrays are read in the dtype of `a` (float32 unless `a` is another float).
    NaN against anything (including NaN) is -1: no distance exists. +0 and -0 are 0
    ULP apart although their bits differ.
    """
    a = np.asarray(a)
    dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32
    a, b = np.asarray(a, dtype), np.asarray(b, dtype)
    d = np.abs(ordered_bits(a) - ordered_bits(b))
    return np.where(np.isnan(a) | np.isnan(b), -1, d)


@dataclasses.dataclass(frozen=True)
class ArrayDiff:
    """How two arrays of one shape and dtype differ (see `array_diff`).

    `equal` compares bytes: -0.0 differs from +0.0 and NaN payloads count. The size
    measures are 0 for equal arrays and None where they do not apply (no float dtype,
    no finite value).
    """

    shape: tuple[int, ...]
    dtype: str
    equal: bool
    num_different: int
    fraction_different: float
    max_abs: float | None = 0.0
    max_rel: float | None = 0.0  # max |a-b| / max(|a|, |b|), elementwise
    rel_to_max: float | None = 0.0  # max |a-b| / max |a|: the scale-aware figure
    max_ulp: int | None = 0
    nan_mismatches: int = 0
    ulp_histogram: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (shape as a list)."""
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out

    def brief(self) -> dict[str, Any]:
        """The headline figures."""
        return {
            k: getattr(self, k)
            for k in ("equal", "fraction_different", "max_ulp", "max_rel", "rel_to_max", "max_abs")
        }


def _max_or_none(x: np.ndarray) -> float | None:
    """The largest value ignoring NaN (infinities count), or None if all are NaN."""
    known = x[~np.isnan(x)]
    return float(known.max()) if known.size else None


def array_diff(a: np.ndarray, b: np.ndarray, *, histogram: bool = False) -> ArrayDiff:
    """Bitwise equality and size of the difference of two arrays (ValueError if their
    shapes or dtypes differ). `histogram` adds the ULP histogram (`ULP_BINS`)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(f"dtype/shape {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
    if a.size:
        differs = (
            a.view(np.uint8).reshape(a.size, -1) != b.view(np.uint8).reshape(b.size, -1)
        ).any(axis=1)
    else:
        differs = np.zeros(0, bool)
    n = int(differs.sum())
    base = dict(
        shape=tuple(a.shape),
        dtype=str(a.dtype),
        equal=n == 0,
        num_different=n,
        fraction_different=n / a.size if a.size else 0.0,
    )
    if n == 0:
        return ArrayDiff(
            **base,
            ulp_histogram=_histogram(np.zeros(a.size, np.int64))
            if histogram and np.issubdtype(a.dtype, np.floating)
            else None,
        )
    fa, fb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    absdiff = np.abs(fa - fb)
    scale = np.maximum(np.abs(fa), np.abs(fb))
    rel = np.divide(absdiff, scale, out=np.zeros_like(absdiff), where=scale > 0)
    top = _max_or_none(np.abs(fa))
    max_abs = _max_or_none(absdiff)
    rel_to_max = None if max_abs is None else (max_abs / top if top else max_abs)
    if not np.issubdtype(a.dtype, np.floating):
        return ArrayDiff(
            **base, max_abs=max_abs, max_rel=_max_or_none(rel), rel_to_max=rel_to_max, max_ulp=None
        )
    ulps = ulp_distance(a, b).ravel()
    valid = ulps[ulps >= 0]
    return ArrayDiff(
        **base,
        max_abs=max_abs,
        max_rel=_max_or_none(rel),
        rel_to_max=rel_to_max,
        max_ulp=int(valid.max()) if valid.size else None,
        nan_mismatches=int((ulps < 0).sum()),
        ulp_histogram=_histogram(valid) if histogram else None,
    )


def _histogram(ulps: np.ndarray) -> dict[str, int]:
    return {
        f"[{lo},{hi})" if hi < 2**63 else f">={lo}": int(((ulps >= lo) & (ulps < hi)).sum())
        for lo, hi in ULP_BINS
    }


# ------------------------------------------------------------- rank statistics


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened array, ties given their average rank."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    r = np.empty(x.size, np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends):
        r[order[s:e]] = (s + e + 1) / 2.0  # average of ranks s+1 .. e
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None if a map is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / denom) if denom > 0 else None


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> float:
    """|top-k(a) & top-k(b)| / k for k = `fraction` of the elements (ties: lower index first)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    k = max(1, int(round(fraction * a.size)))
    ta = np.argsort(-a, kind="stable")[:k]
    tb = np.argsort(-b, kind="stable")[:k]
    return len(np.intersect1d(ta, tb)) / k
