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
class ModelSpec:
    """A registered model: its module and the facts the tools need about it.

    `keras_layers(model)` maps each sown activation to the Keras layer of the twin whose
    output equals it, in forward order; `keras_gradcam_layer` is the Keras layer whose
    output is A. `config_options` are the config keys passed to the module besides
    `dropout_rate` (a key missing from an old run's config keeps the module default).
    """

    name: str
    module: type[nn.Module]
    min_image_size: int
    gradcam: GradcamLayer
    keras_gradcam_layer: str
    keras_layers: Callable[[nn.Module], dict[str, str]]
    config_options: tuple[str, ...] = ()

    def build(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
        """The module, with `dropout_rate` and `config_options` from `config`, then `kwargs`.

        A config in the portable determinism mode gets the portable convolutions and
        dense product (`jaxrepro.models.ops.portable`).
        """
        settings: dict[str, Any] = {}
        if config is not None:
            settings["dropout_rate"] = config["dropout_rate"]
            settings.update({k: config[k] for k in self.config_options if k in config})
            if config.get("determinism") == "portable":
                settings.update(portable.FIELDS)
        return self.module(**{**settings, **kwargs})
