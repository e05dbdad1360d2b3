"""What the tools need to know about a model, declared once next to the model.

Each model file exports its Flax module and a `ModelSpec`: the Grad-CAM layer (the
activation A and where it flows on), the Keras layer names of its twin
(`jaxrepro.tfref.models`), the smallest image size it takes and the config keys it reads.
Training, explanations, the analysis tools and the TensorFlow exchange read the spec;
none of them keeps its own table of models. What can be found by tracing the model is
not declared: which batch norms LRP merges into the layer before them
(`jaxrepro.explain.canonize`), and, for a model without a spec, the Grad-CAM layer
(`jaxrepro.explain.gradcam`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn

from jaxrepro.models.ops import portable


@dataclasses.dataclass(frozen=True)
class GradcamLayer:
    """Grad-CAM's A: the sown activation `activation`, which flows on as the `input`
    (flattened) or the `output` of the top-level submodule `module`."""

    activation: str
    module: str
    where: Literal["input", "output"]


@dataclasses.dataclass(frozen=True)
class PoolPoint:
    """One max pooling's decision: the sown activation that is its input, and its windows."""

    input: str
    window: tuple[int, int]
    strides: tuple[int, int]
    padding: Literal["VALID", "SAME"]


@dataclasses.dataclass(frozen=True)
class DecisionPoints:
    """Where a forward pass decides rather than rounds (`jaxrepro.analysis.decisions`).

    `relus`: the sown output of each call of the model's `activation` (a ReLU passes
    what its output shows as > 0); `pools`: each call of its `pool`. Both in call order.
    """

    relus: tuple[str, ...]
    pools: tuple[PoolPoint, ...]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its module and the facts the tools need about it.

    `gradcam` is a `GradcamLayer` or the module path whose output is A (the pretrained
    networks name the Keras layer keras.io's Grad-CAM example takes).

    `keras_layers(model)` maps each sown activation to the Keras layer of the twin whose
    output equals it, in forward order; `keras_gradcam_layer` is the Keras layer whose
    output is A. `config_options` are the config keys passed to the module besides
    `dropout_rate` (a key missing from an old run's config keeps the module default).
    `decision_points(model)` names its ReLUs and max poolings (`DecisionPoints`).
    """

    name: str
    module: type[nn.Module]
    min_image_size: int
    gradcam: GradcamLayer | str
    keras_gradcam_layer: str
    keras_layers: Callable[[nn.Module], dict[str, str]]
    config_options: tuple[str, ...] = ()
    # An ImageNet network of `keras.applications` (`jaxrepro.pretrained`): the Keras
    # constructor's name, the input size its weights were trained at, and the Flax module
    # path of each Keras layer that has weights, in `keras_model.layers` order (the order
    # Keras's own h5 weight files are read in). None for the paper's models, whose
    # Keras twins carry the Flax names (`jaxrepro.tfref.transfer`).
    keras_application: str | None = None
    image_size: int | None = None
    keras_weight_order: Callable[[nn.Module], list[str]] | None = None
    # The LRP composite `jaxrepro.explain` uses for this model by default
    # (`jaxrepro.explain.lrp.COMPOSITES` name or spec string); None: "thesis".
    lrp_composite: str | None = None
    decision_points: Callable[[nn.Module], DecisionPoints] | None = None
    # (field, value) pairs the portable mode sets besides the convolutions and the
    # dense product (`portable.FIELDS`): the XLA form of an op whose default runs one
    # of jaxrepro's kernels, which the host's compiler builds. Pairs, not a dict, so
    # that a spec stays hashable.
    portable_fields: tuple[tuple[str, Any], ...] = ()

    @property
    def pretrained(self) -> bool:
        """An ImageNet classifier (logits [N, 1000]) rather than the paper's one-logit head."""
        return self.keras_application is not None

    def build(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
        """The module, with `dropout_rate` and `config_options` from `config`, then `kwargs`.

        A config in the portable determinism mode gets the portable convolutions and
        dense product (`jaxrepro.models.ops.portable`) and the spec's `portable_fields`.
        """
        settings: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(self.module)}
        if config is not None:
            if "dropout_rate" in fields:  # the pretrained networks have no dropout
                settings["dropout_rate"] = config["dropout_rate"]
            settings.update({k: config[k] for k in self.config_options if k in config})
            if config.get("determinism") == "portable":
                settings.update({**portable.FIELDS, **dict(self.portable_fields)})
        return self.module(**{**settings, **kwargs})
