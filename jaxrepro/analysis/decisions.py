"""The discrete decisions of a forward pass, and a gradient recomputed under another's.

Max pooling and ReLU are piecewise. Which input a window routes its gradient to, and
which elements a ReLU passes, are decisions, not roundings: two forwards 1e-6 apart
(JAX and Keras on other kernels) decide differently wherever a value sits within
rounding of its threshold, and one flipped window moves a whole gradient to another
pixel. This module

* reads the decisions off a forward's sown activations (`read`): the ReLU masks
  (output > 0) and each pool window's arg-max (the first maximum in row-major window
  order, as both frameworks break ties), at the points the model's spec names
  (`ModelSpec.decision_points`);
* counts where two forwards decide differently, with how close to the threshold each
  flip was (`compare`);
* recomputes a gradient on this side with the other side's decisions
  (`aligned_gradients`: every ReLU passes what the other side's passed, every window
  routes to the other side's arg-max), so that a gradient gap splits into formula
  differences (what remains once the decisions agree) and flipped decisions (the rest).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from jaxrepro import models
from jaxrepro.models.spec import DecisionPoints, PoolPoint
from jaxrepro.numerics import ordered_bits
from jaxrepro.train import steps


@dataclasses.dataclass(frozen=True)
class Decisions:
    """A forward's decisions, in the call order of `DecisionPoints`."""

    masks: tuple[np.ndarray, ...]  # bool, one per ReLU: the elements it passes
    routes: tuple[np.ndarray, ...]  # int32 [N, Ho, Wo, C], one per pool: window arg-max


def points_of(model: nn.Module) -> DecisionPoints:
    """The model's ReLUs and max poolings, from its spec (ValueError if it has none)."""
    spec = models.spec_of(model)
    if spec is None or spec.decision_points is None:
        raise ValueError(f"{type(model).__name__} declares no decision points")
    return spec.decision_points(model)


def windows(x: jax.Array, point: PoolPoint) -> jax.Array:
    """The pool's windows of NHWC `x`: [N, Ho, Wo, C, kh*kw], row-major within a window;
    SAME padding is -inf, which no window takes as its maximum."""
    (kh, kw), (sh, sw) = point.window, point.strides
    pads = lax.padtype_to_pads(x.shape[1:3], point.window, point.strides, point.padding)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    taps = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps, axis=-1)


def routing(x: np.ndarray, point: PoolPoint) -> np.ndarray:
    """Each window's arg-max (the first maximum, as select-and-scatter and TF pick it)."""
    return np.asarray(jnp.argmax(windows(jnp.asarray(x), point), axis=-1), np.int32)


def read(acts: Mapping[str, np.ndarray], points: DecisionPoints) -> Decisions:
    """The decisions a forward took, from its sown activations `acts`."""
    return Decisions(
        masks=tuple(np.asarray(acts[name]) > 0 for name in points.relus),
        routes=tuple(routing(np.asarray(acts[p.input]), p) for p in points.pools),
    )


def _margin_ulp(w: np.ndarray, first: np.ndarray, other: np.ndarray) -> np.ndarray:
    """ULP distance between the window values at two arg-max choices (int64)."""
    a = np.take_along_axis(w, first[..., None], -1)[..., 0]
    b = np.take_along_axis(w, other[..., None], -1)[..., 0]
    return np.abs(ordered_bits(a.astype(np.float32)) - ordered_bits(b.astype(np.float32)))


def compare(
    ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray], points: DecisionPoints
) -> dict[str, list[dict[str, Any]]]:
    """Where two forwards of one batch decide differently.

    Per ReLU: its elements, how many pass on one side only, and the largest value that
    crossed zero (absolute and over the layer's largest). Per pool: its windows, how
    many route elsewhere, how far apart (ULP, on our side) the two chosen inputs of a
    flipped window are, the windows with an exact tie of nonzero values on our side (both
    frameworks break those the same way), and our closest margin between the two
    largest inputs of a window that has no tie.
    """
    relus = []
    for name in points.relus:
        a, b = np.asarray(ours[name], np.float32), np.asarray(theirs[name], np.float32)
        flipped = (a > 0) != (b > 0)
        crossed = np.maximum(np.abs(a), np.abs(b))[flipped]
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        top = float(crossed.max()) if crossed.size else 0.0
        relus.append(
            {
                "activation": name,
                "elements": int(a.size),
                "flipped": int(flipped.sum()),
                "flipped_max_abs": top,
                "flipped_rel_to_max": top / scale if scale > 0 else 0.0,
            }
        )
    pools = []
    for p in points.pools:
        w = np.asarray(windows(jnp.asarray(ours[p.input], jnp.float32), p))
        mine = np.argmax(w, axis=-1).astype(np.int32)
        other = routing(np.asarray(theirs[p.input], np.float32), p)
        flipped = mine != other
        ordered = np.sort(w, axis=-1)
        # Ties of zeros (ReLU outputs) route a zero gradient wherever they go.
        tie = (ordered[..., -1] == ordered[..., -2]) & (ordered[..., -1] != 0)
        gaps = np.abs(ordered_bits(ordered[..., -1]) - ordered_bits(ordered[..., -2]))
        distinct = (ordered[..., -1] != ordered[..., -2]) & np.isfinite(ordered[..., -2])
        gaps = gaps[distinct]
        margins = _margin_ulp(w, mine, other)[flipped]
        pools.append(
            {
                "input": p.input,
                "windows": int(mine.size),
                "flipped": int(flipped.sum()),
                "flipped_margin_ulp_max": int(margins.max()) if margins.size else None,
                "exact_ties": int(tie.sum()),
                "closest_margin_ulp": int(gaps.min()) if gaps.size else None,
            }
        )
    return {"relus": relus, "pools": pools}


class _Replay:
    """The k-th call returns `apply(input, decisions[k])`: a ReLU or a pool that replays
    given decisions, in the order the model calls it."""

    def __init__(self, apply: Callable[[jax.Array, Any], jax.Array], decisions: list) -> None:
        self.apply, self.decisions, self.calls = apply, decisions, 0

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.calls >= len(self.decisions):
            raise RuntimeError(f"{self.calls + 1} calls for {len(self.decisions)} decisions")
        out = self.apply(x, self.decisions[self.calls])
        self.calls += 1
        return out


def _routed_pool(point: PoolPoint) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def pool(x: jax.Array, route: jax.Array) -> jax.Array:
        return jnp.take_along_axis(windows(x, point), route[..., None], axis=-1)[..., 0]

    return pool


@functools.partial(jax.jit, static_argnames="model")
def _replayed_gradients(params, batch_stats, x, y, masks, routes, *, model: nn.Module):
    """`aligned_gradients`' computation, compiled once per model and shapes (a compare
    replays both sides' decisions on one batch)."""
    points = points_of(model)
    relu = _Replay(lambda v, m: jnp.where(m, v, jnp.zeros((), v.dtype)), list(masks))
    pool = _Replay(
        lambda v, d: d[0](v, d[1]),
        [(_routed_pool(p), r) for p, r in zip(points.pools, routes)],
    )
    replayed = model.clone(activation=relu, pool=pool)
    g = steps.loss_and_grads(replayed, params, batch_stats, x, y)
    if relu.calls != len(masks) or pool.calls != len(routes):
        raise RuntimeError(
            f"the model called its ReLU {relu.calls} and its pool {pool.calls} times; "
            f"its spec names {len(masks)} and {len(routes)}"
        )
    return g.grads


def aligned_gradients(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    decisions: Decisions,
) -> Any:
    """d(mean loss)/d(params) of the batch (training mode, as `steps.loss_and_grads`),
    with every ReLU passing what `decisions` passed and every pool window routing to
    its arg-max; the formulas are this side's, the decisions the other side's."""
    points = points_of(model)
    if len(decisions.masks) != len(points.relus) or len(decisions.routes) != len(points.pools):
        raise ValueError("decisions do not fit the model's decision points")
    return _replayed_gradients(
        variables["params"],
        variables.get("batch_stats", {}),
        jnp.asarray(images),
        jnp.asarray(labels),
        tuple(jnp.asarray(m) for m in decisions.masks),
        tuple(jnp.asarray(r) for r in decisions.routes),
        model=model,
    )


def training_forward(
    model: nn.Module, variables: Mapping[str, Any], images: jax.Array
) -> dict[str, np.ndarray]:
    """The sown activations of a batch in training mode (batch statistics), as the
    first step's forward computes them."""

    @jax.jit
    def forward(variables, x):
        _, state = model.apply(variables, x, train=True, mutable=["intermediates", "batch_stats"])
        return models.flat_intermediates(state["intermediates"])

    acts = forward(dict(variables), jnp.asarray(images))
    return {k: np.asarray(v) for k, v in acts.items()}
