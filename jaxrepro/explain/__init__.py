"""Explanations of any Flax Linen model: heatmaps that come out the same bits every time.

Every method has one signature, registered by name in `METHODS`:

    fn(model, variables, images, *, sign, target, **options) -> heatmap [N, H, W]

`images` [N, H, W, C] are what the model takes (the paper's models: pixels 0..255);
the heatmap has their float dtype (float64 with `jax_enable_x64`). A method explains one
score per image (`heads.py`): for a one-logit head ([N] or [N, 1]) `sign * logit`, with
`sign` a number or an [N] array of +-1 (the paper's models: `+1` explains "dog", `-1`
"cat"); for a multi-class head [N, C] the logit of class `target` (an int or [N] ints;
default the predicted class). Nothing has to be registered: the paper's models carry a
spec (`jaxrepro.models`) that names their Grad-CAM layer, any other model is traced.
Methods:

  gradcam          gradcam.py  Grad-CAM at the last conv-like layer (option layer), ReLU,
                               max-normalised, bilinear upsampled: [0, 1]
  guided-backprop  gradcam.py  guided gradient w.r.t. the pixels, summed over channels
                               (signed)
  guided-gradcam   gradcam.py  guided backprop x Grad-CAM (signed)
  ig               ig.py       Integrated Gradients summed over channels (signed; sums to
                               the logit difference); options baseline, steps, rule, chunk
  lrp              lrp.py      Layer-wise Relevance Propagation summed over channels
                               (signed); option composite
  lime             lime.py     LIME (the `lime` package's image explainer): each quickshift
                               superpixel gets its ridge coefficient (signed); options
                               num_samples, seed, batch_size, num_features

Other modules: `heads.py` (the explained score of any head, inference mode),
`canonize.py` (batch norms merged into the layer before them for LRP), `render.py`
(colour-map overlays as PNG), `metrics.py` (pointing game, relevance mass in the object
mask), `robustness.py` (the thesis's rotation and noise protocol, `python -m
jaxrepro.explain.robustness`), `checks.py` (faithfulness, the randomisation sanity
check, the local Lipschitz estimate) with `check_report.py` (their CSV rows and plots),
`prediction.py`, `inputs.py` and the CLI `cli.py` (`python -m jaxrepro.explain`).

Bits: every method is a jitted pure function (LIME: a jitted model evaluation between
scikit-image's segmentation and NumPy's float64 ridge fit); the same inputs (same
shapes) give the same bits on every call and in every process (tested). The CLI explains one image
per call, so an image's heatmap does not depend on the other images given with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

# Modules, not their functions, are the package's attributes (`explain.gradcam` is
# the module gradcam.py, `explain.lrp` the module lrp.py).
from jaxrepro.explain import gradcam as _gradcam
from jaxrepro.explain import ig as _ig
from jaxrepro.explain import lime as _lime
from jaxrepro.explain import lrp as _lrp

Method = Callable[..., jax.Array]


def lrp_heatmap(
    model: Any,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    composite: str = "thesis",
) -> jax.Array:
    """LRP heatmap [N, H, W] (`jaxrepro.explain.lrp`) summed over the colour channels."""
    relevance = _lrp.attribute(
        model, variables, images, sign=sign, target=target, composite=composite
    )
    return _lrp.heatmap(relevance)


METHODS: dict[str, Method] = {
    "gradcam": _gradcam.gradcam,
    "guided-backprop": _gradcam.guided_backprop,
    "guided-gradcam": _gradcam.guided_gradcam,
    "ig": _ig.integrated_gradients,
    "lrp": lrp_heatmap,
    "lime": _lime.lime,
}

# Options each method accepts (the CLIs pass only these).
OPTIONS: dict[str, tuple[str, ...]] = {
    "gradcam": ("layer",),
    "guided-backprop": (),
    "guided-gradcam": ("layer",),
    "ig": ("baseline", "steps", "rule", "chunk"),
    "lrp": ("composite",),
    "lime": ("num_samples", "seed", "batch_size", "num_features"),
}

# What "all methods" means for the tools that compare many maps (robustness, variants):
# the gradient methods. LIME evaluates the model num_samples times per map (1,000 by
# default), so it is asked for by name.
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "lime")

# Methods whose heatmap is non-negative (shown with "jet"); the others are signed.
UNSIGNED: frozenset[str] = frozenset({"gradcam"})


def get_method(name: str) -> Method:
    """The method registered under `name` (ValueError listing the valid names)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}") from None


def explain(
    name: str,
    model: Any,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    **options: Any,
) -> jax.Array:
    """Heatmaps [N, H, W] of method `name`; options it does not take are dropped."""
    method = get_method(name)
    accepted = {k: v for k, v in options.items() if k in OPTIONS[name] and v is not None}
    return method(model, variables, images, sign=sign, target=target, **accepted)


def explain_each(
    model: Any, variables: Any, images: np.ndarray, methods: Sequence[str] = DEFAULT_METHODS
) -> dict[str, np.ndarray]:
    """Heatmaps [N, H, W] of `images` by each method, explaining "dog" (sign +1), every
    image in a batch of one as the CLI explains it: what two runs' explanations are
    compared by (`jaxrepro.analysis.variants`)."""
    pixels = np.asarray(images, np.float32)
    return {
        name: np.stack([np.asarray(explain(name, model, variables, x[None]))[0] for x in pixels])
        for name in methods
    }


__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "OPTIONS",
    "UNSIGNED",
    "explain",
    "explain_each",
    "get_method",
    "lrp_heatmap",
]
