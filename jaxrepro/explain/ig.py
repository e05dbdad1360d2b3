"""Integrated Gradients (Sundararajan et al. 2017), batched over the path, deterministic.

    IG_i(x) = (x_i - b_i) * integral_0^1 d(sign*logit)/dx_i (b + a (x - b)) da

approximated by a fixed quadrature over `steps` intervals of the straight path from
the baseline b (default: a black image, all zeros) to x:

- "trapezoid" (default): the gradient at a = 0, 1/steps, ..., 1 (steps + 1 points),
  end points weighted 1/(2 steps), the others 1/steps. Exact when the gradient is
  linear along the path; so completeness, sum_i IG_i = f(x) - f(b), holds up to the
  quadrature error, which shrinks as O(1/steps^2) for a smooth f.
- "midpoint": the gradient at a = (k + 1/2)/steps, k = 0..steps-1, weights 1/steps.

The path points are evaluated `chunk` at a time (a batch of chunk x N images), and
the weighted gradients are summed chunk after chunk in a fixed order (`lax.fori_loop`);
points and weights are computed in float32 from (k, steps), so the result is a pure
function of (model, variables, images, baseline, steps, rule, chunk). Padding points in
the last chunk have weight 0. `steps` is traced: one compilation serves every count.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro.explain import heads

RULES = ("trapezoid", "midpoint")


def _nodes(k: Any, steps: Any, rule: str, xp: Any = np) -> tuple[Any, Any]:
    """(alpha, weight) of path points k (ints) of `rule`, in float32 arithmetic.

    `xp` is numpy (for `quadrature`) or jax.numpy (inside the jitted loop): the same
    IEEE float32 operations, so both give the same numbers.
    """
    kf, n = xp.asarray(k).astype(xp.float32), xp.asarray(steps).astype(xp.float32)
    if rule == "trapezoid":
        alpha = kf / n
        ends = (xp.asarray(k) == 0) | (xp.asarray(k) == xp.asarray(steps))
        weight = xp.where(ends, xp.float32(0.5) / n, xp.float32(1.0) / n)
    elif rule == "midpoint":
        alpha = (kf + xp.float32(0.5)) / n
        weight = xp.broadcast_to(xp.float32(1.0) / n, kf.shape)
    else:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {list(RULES)}")
    return alpha.astype(xp.float32), weight.astype(xp.float32)


def num_points(steps: Any, rule: str) -> Any:
    """How many gradients the rule evaluates: steps + 1 (trapezoid) or steps (midpoint)."""
    return steps + 1 if rule == "trapezoid" else steps


def quadrature(steps: int, rule: str = "trapezoid") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights), float32, of the path quadrature; the weights sum to 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return _nodes(np.arange(num_points(steps, rule)), steps, rule)


def _path_gradient(
    grad_fn, images: jax.Array, baseline: jax.Array, steps: jax.Array, rule: str, chunk: int
) -> jax.Array:
    """sum_k w_k grad_fn(baseline + a_k (images - baseline)), `chunk` points at a time.

    `steps` is traced (one compilation serves every step count): the loop runs
    ceil(points / chunk) times in order; points past the last have weight 0.
    """
    diff = images - baseline
    n = images.shape[0]
    points = num_points(steps, rule)

    def body(i, total):
        k = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
        alpha, weight = _nodes(k, steps, rule, jnp)
        valid = k < points
        alpha, weight = jnp.where(valid, alpha, 0.0), jnp.where(valid, weight, 0.0)
        path = baseline[None] + alpha[:, None, None, None, None] * diff[None]  # [K,N,H,W,C]
        grads = grad_fn(path.reshape(chunk * n, *images.shape[1:]))
        return total + jnp.tensordot(weight, grads.reshape(chunk, *images.shape), axes=1)

    return jax.lax.fori_loop(0, (points + chunk - 1) // chunk, body, jnp.zeros_like(images))


def _integrated_gradients(
    score, images: jax.Array, baseline: Any, steps: jax.Array, rule: str, chunk: int
) -> jax.Array:
    """(x - b) * path-averaged grad of `score` (a scalar function of a [K*N, ...] batch)."""
    images = heads.as_input(images)
    baseline = (
        jnp.zeros_like(images)
        if baseline is None
        else jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)
    )
    return (images - baseline) * _path_gradient(
        jax.grad(score), images, baseline, jnp.asarray(steps, jnp.int32), rule, chunk
    )


def _check(steps: int, rule: str, chunk: int) -> None:
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules: {list(RULES)}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")


@functools.partial(jax.jit, static_argnames=("fn", "rule", "chunk"))
def _ig_fn(fn, images, baseline, steps, rule, chunk):
    return _integrated_gradients(lambda x: jnp.sum(fn(x)), images, baseline, steps, rule, chunk)


def integrated_gradients_fn(
    fn,
    images: jax.Array,
    baseline: Any = None,
    *,
    steps: int = 32,
    rule: str = "trapezoid",
    chunk: int = 8,
) -> jax.Array:
    """IG attributions of `fn(x [B, ...]) -> [B]`, one value per example.

    `fn` must treat the examples of a batch independently (a model: in eval mode).
    Returns an array of the shape of `images`.
    """
    _check(steps, rule, chunk)
    return _ig_fn(fn, images, baseline, steps, rule, chunk)


@functools.partial(jax.jit, static_argnames=("model", "rule", "chunk"))
def _ig_model(model, variables, images, signs, targets, baseline, steps, rule, chunk):
    n = images.shape[0]
    targets = heads.fixed_targets(model, variables, images, targets)

    def score(x):  # x: [K*N, H, W, 3], path point k of image i at row k*N + i
        rows = None if targets is None else jnp.tile(targets, x.shape[0] // n)
        logits = heads.inference_apply(model, variables, x)
        return jnp.sum(signs[None] * heads.selected_logit(logits, rows).reshape(-1, n))

    return _integrated_gradients(score, images, baseline, steps, rule, chunk)


def integrated_gradients_attribution(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    baseline: Any = None,
    steps: int = 32,
    rule: str = "trapezoid",
    chunk: int = 8,
) -> jax.Array:
    """IG attributions [N, H, W, C] of the explained score w.r.t. the model's input.

    The score is `jaxrepro.explain.heads.score` (`sign * logit`, or the logit of class
    `target` of a multi-class head, by default the class predicted for the image
    itself, kept along the path). `baseline`: None (black image) or an array
    broadcastable to `images`. The images' float dtype is kept. One compilation per
    (model, shapes, rule, chunk): `steps` is a traced argument.
    """
    _check(steps, rule, chunk)
    images = heads.as_input(images)
    n = images.shape[0]
    return _ig_model(
        model,
        variables,
        images,
        heads.signs(sign, n, images.dtype),
        heads.targets(target, n),
        baseline,
        steps,
        rule,
        chunk,
    )


def integrated_gradients(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    baseline: Any = None,
    steps: int = 32,
    rule: str = "trapezoid",
    chunk: int = 8,
) -> jax.Array:
    """Integrated Gradients heatmap [N, H, W]: the attributions summed over channels.

    The heatmap sums to score(x) - score(baseline) up to the quadrature error.
    """
    return jnp.sum(
        integrated_gradients_attribution(
            model,
            variables,
            images,
            sign=sign,
            target=target,
            baseline=baseline,
            steps=steps,
            rule=rule,
            chunk=chunk,
        ),
        axis=-1,
    )
