"""The TF side of the pretrained ImageNet networks: Keras weight files to Flax-named arrays.

`export` builds `keras.applications.<Constructor>(weights=None)` at the network's input
size, loads the user's weight file into it the way Keras does, and writes every weight
under its Flax name (`transfer.from_keras_ordered`, with the Flax module paths the JAX
side sends in ORDER.json) to an `.npz`, with the SHA-256 of the source file. Files Keras
reads:

* a legacy `.h5` / `.hdf5` file, as `keras.applications` caches them in
  `~/.keras/models/` (weights only, or a whole model): `model.load_weights`, which pairs
  the file's layers with the model's by position, as Keras itself does for these files;
* a `.weights.h5` file written by Keras 3's `model.save_weights`: `model.load_weights`;
* a `.keras` model: `keras.saving.load_model`, then its weights by position, checked
  layer by layer against the architecture.

`reference` makes what the tests compare against, from random weights: a legacy `.h5`
file (the format of Keras's own downloads), the Keras logits of given images after the
network's `preprocess_input`, and Grad-CAM by the keras.io recipe. TF side only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro.errors import UserError
from jaxrepro.tfref import transfer, weights

os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is imported anywhere

# The `keras.applications` constructor's name -> its `preprocess_input` module.
PREPROCESS = {"Xception": "xception", "InceptionV3": "inception_v3", "VGG16": "vgg16"}


class WeightFileError(UserError, ValueError):
    """A weight file Keras cannot read, or one made for another network."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(constructor: str, image_size: int) -> Any:
    """`keras.applications.<constructor>` with random weights, logits out (no softmax)."""
    import keras  # noqa: PLC0415

    if constructor not in PREPROCESS:
        raise ValueError(f"unknown Keras application {constructor!r}; valid: {sorted(PREPROCESS)}")
    return getattr(keras.applications, constructor)(
        weights=None, input_shape=(image_size, image_size, 3), classifier_activation=None
    )


def preprocess(constructor: str, images: np.ndarray) -> np.ndarray:
    """Keras's `preprocess_input` of this network, on a copy of float32 pixels 0..255."""
    import keras  # noqa: PLC0415

    module = getattr(keras.applications, PREPROCESS[constructor])
    return np.asarray(module.preprocess_input(np.array(images, np.float32)), np.float32)


def _shapes(layer: Any) -> list[tuple[str, tuple[int, ...]]]:
    return [(v.name, tuple(v.shape)) for v in layer.weights]


def _copy_by_position(source: Any, model: Any) -> None:
    """Assign `source`'s weights to `model`, weighted layer by weighted layer."""
    src, dst = transfer.weighted_layers(source), transfer.weighted_layers(model)
    if len(src) != len(dst):
        raise WeightFileError(
            f"the file's model has {len(src)} layers with weights, {model.name} has "
            f"{len(dst)}: a model of another architecture"
        )
    for i, (a, b) in enumerate(zip(src, dst)):
        if _shapes(a) != _shapes(b):
            raise WeightFileError(
                f"weighted layer {i} ({a.name}) of the file has {_shapes(a)}, {model.name}'s "
                f"{b.name} has {_shapes(b)}: a model of another architecture"
            )
        for va, vb in zip(a.weights, b.weights):
            vb.assign(va.numpy())


def load_source(model: Any, path: str | Path) -> None:
    """Load a Keras weight file or model into `model` (see the module doc for formats)."""
    import keras  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"no such file: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".keras"):
            _copy_by_position(keras.saving.load_model(path, compile=False), model)
        elif name.endswith((".h5", ".hdf5")):
            model.load_weights(path)
        else:
            raise WeightFileError(
                f"{path}: expected a Keras .h5, .hdf5, .weights.h5 or .keras file"
            )
    except WeightFileError:
        raise
    except Exception as e:  # h5py, zipfile and Keras raise many types for bad files
        raise WeightFileError(
            f"{path} cannot be read as weights of {model.name}: {type(e).__name__}: {str(e)[:400]}"
        ) from e


def export(
    constructor: str, order_file: str, source: str, out: str, image_size: int
) -> dict[str, Any]:
    """Weights of `source` as Flax-named arrays in `out` (.npz); a JSON-able record."""
    import keras  # noqa: PLC0415

    model = build(constructor, image_size)
    load_source(model, source)
    order = json.loads(Path(order_file).read_text())
    flat = transfer.from_keras_ordered(model, order)
    weights.save(out, flat)
    return {
        "keras_application": constructor,
        "source": str(Path(source).resolve()),
        "source_sha256": file_sha256(source),
        "image_size": image_size,
        "keras": keras.__version__,
        "weighted_layers": len(order),
        "arrays": len(flat),
    }


def _randomise(model: Any, constructor: str, seed: int) -> None:
    """Random weights under which the output depends on the image, so that a layout or
    preprocessing error shows in the logits: Keras's default moving statistics (0, 1)
    and Glorot kernels leave a deep network's logits nearly constant. Batch norms get
    random gamma and beta, moving statistics from one training-mode call on random
    images (momentum 0 for that call), then perturbed; a network without batch norm
    (VGG-16) gets its kernels scaled by sqrt(2) (He's scale for ReLU); the classifier
    a random bias."""
    import keras  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    bns = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    for layer in bns:
        c = layer.moving_mean.shape[0]
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
        layer.beta.assign(rng.normal(0.0, 0.2, c).astype(np.float32))
    if not bns:
        for layer in transfer.weighted_layers(model):
            layer.kernel.assign(layer.kernel.numpy() * np.float32(np.sqrt(2.0)))
    head = model.get_layer("predictions")
    head.bias.assign(rng.normal(0.0, 0.1, head.bias.shape).astype(np.float32))
    if bns:
        size = int(model.inputs[0].shape[1])
        calibration = rng.integers(0, 256, (8, size, size, 3)).astype(np.float32)
        for layer in bns:
            layer.momentum = 0.0
        model(preprocess(constructor, calibration), training=True)
        for layer in bns:
            layer.momentum = 0.99
            c = layer.moving_mean.shape[0]
            mean, var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
            layer.moving_mean.assign(
                (mean + rng.normal(0, 0.1, c) * np.sqrt(var)).astype(np.float32)
            )
            layer.moving_variance.assign((var * rng.uniform(0.8, 1.25, c)).astype(np.float32))


def reference(
    constructor: str,
    image_size: int,
    images_file: str,
    gradcam_layer: str,
    outdir: str,
    seed: int = 0,
) -> dict[str, Any]:
    """Random-weight reference of one network: OUTDIR/weights.h5 (legacy format; the
    same weights as Keras 3's model.weights.h5 and model.keras), OUTDIR/reference.npz
    (logits, Grad-CAM of the top class), and parameter counts at the default size."""
    import h5py  # noqa: PLC0415
    import keras  # noqa: PLC0415
    from keras.src.legacy.saving import legacy_h5_format  # noqa: PLC0415

    from jaxrepro.tfref import matched, models  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    model = build(constructor, image_size)
    _randomise(model, constructor, seed)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    with h5py.File(out / "weights.h5", "w") as f:  # what Keras's downloads are
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    model.save_weights(out / "model.weights.h5")  # Keras 3's own formats
    model.save(out / "model.keras")
    x = preprocess(constructor, np.load(images_file, allow_pickle=False))
    logits = np.asarray(model(x, training=False).numpy(), np.float32)
    top = np.argmax(logits, axis=1)
    lowres, cam = matched.keras_gradcam(model, gradcam_layer, "predictions", top)(x)
    np.savez(out / "reference.npz", logits=logits, gradcam=cam, gradcam_lowres=lowres)
    default = getattr(keras.applications, constructor)(weights=None)
    return {
        "keras_application": constructor,
        "image_size": image_size,
        "params": models.count_params(default),
        "params_at_image_size": models.count_params(model),
        "weighted_layers": len(transfer.weighted_layers(model)),
    }
