"""A per-layer probe of a train state, stored with each checkpoint to localise divergence.

For a fixed probe batch (the first `batch_size` validation images, not augmented,
so that every operation runs at the shapes of a training step) the probe holds
  * the `logits` of the batch and every sown forward activation (inference mode) of
    its first `diff_probe_examples` images (activations are large; the rest are
    computed but not kept), and
  * the gradient of the training loss with respect to every parameter (training
    mode: batch statistics, and dropout from the run's own `probe` PRNG stream).
The order in which layers run is stored with it (checkpoint metadata).
`jaxrepro.analysis.diff` compares two probes layer by layer: the first forward
activation that differs between two runs with equal parameters says which layer a
device or code path computes differently; the first gradient that differs (in backward
order) does the same for backpropagation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from jaxrepro import rng
from jaxrepro.models import flat_intermediates
from jaxrepro.train import steps

# Modules that own parameters (leaves of the model tree).
LAYER_TYPES = (nn.Conv, nn.Dense, nn.BatchNorm)


def call_order(model: nn.Module, variables: dict, images: jax.Array) -> dict[str, list[str]]:
    """Forward order of the model's activations and of its parameterised layers.

    `activations`: sown names ('conv1_out', 'block2/act_a', ...) in the order the
    forward pass produced them (jit returns dicts key-sorted, so the order is read
    while tracing); `layers`: module paths ('conv1', 'block2/sepconv_a/depthwise')
    of the convolutions, batch norms and dense layers in call order.
    """
    layers: list[str] = []
    activations: list[str] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, LAYER_TYPES):
            path = "/".join(context.module.path)
            if path not in layers:
                layers.append(path)
        return next_fun(*args, **kwargs)

    def forward(v, x):
        out, inter = model.apply(v, x, train=False, mutable=["intermediates"])
        activations.extend(flat_intermediates(inter["intermediates"]))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(forward, variables, images)
    return {"activations": activations, "layers": layers}


def make_probe(model: nn.Module, keep: int) -> Callable:
    """A jitted `(params, batch_stats, images, labels, key, step) -> probe pytree`.

    Activations are kept for the first `keep` images of the batch.
    """

    def probe(params, batch_stats, images, labels, probe_key, step):
        variables = {"params": params, "batch_stats": batch_stats}
        logits, inter = model.apply(variables, images, train=False, mutable=["intermediates"])
        g = steps.loss_and_grads(
            model, params, batch_stats, images, labels, rng.step_key(probe_key, step)
        )
        return {
            "logits": logits,
            "loss": g.loss,
            "activations": {
                k: v[:keep] for k, v in flat_intermediates(inter["intermediates"]).items()
            },
            "gradients": g.grads,
        }

    return jax.jit(probe)


def forward_order(model: nn.Module, variables: dict, images: jax.Array) -> list[str]:
    """The sown activations in the order the forward pass computes them, then 'logits'."""
    return call_order(model, variables, images)["activations"] + ["logits"]


def gradient_order(layers: list[str], names: Any) -> list[str]:
    """Flat gradient names ('conv1/kernel') in backward order: the last layer first.

    `layers` is `call_order(...)['layers']`; names of layers it does not list follow,
    sorted.
    """
    ordered: list[str] = []
    for layer in reversed(layers):
        ordered += sorted(n for n in names if n.rsplit("/", 1)[0] == layer)
    return ordered + sorted(set(names) - set(ordered))


def flat_gradients(gradients: Any) -> dict[str, Any]:
    """{'conv1/kernel': array, ...} from the nested gradient tree."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}/{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    visit("", gradients)
    return flat
