"""The matched protocol: the same initial weights and batches for JAX and for Keras.

`python -m jaxrepro.analysis.compare` and `python -m jaxrepro.analysis.variance`
measure framework numerics, so both frameworks must see exactly the same inputs.
The JAX side builds them once, as a training run of the config would:

* the initial weights of the config's seed (`init` stream);
* the first N training batches (`epoch_order` of the `shuffle` stream, augmented with
  the step keys of the `augment` stream). The augmentation runs here, jitted on its
  own, and both frameworks get these float32 pixels;
* dropout off on both sides (Flax `dropout_rate=0`; the Keras Dropout's rate 0), so
  training mode means batch statistics only; BCE on the logit; Keras RMSprop.

`write_exchange` puts them in a directory of plain files (`init.npz`, `inputs.npz`,
`layers.json`: the Keras layer names from the model's spec), the only thing the
Keras process (`python -m jaxrepro.tfref matched`) reads. Run as a module, this is the
JAX trainer of that protocol in a process of its own:

    python -m jaxrepro.analysis.matched EXCHANGE_DIR OUT_DIR CONFIG_FILE [--eigen]
                                        [--config.KEY=V ...]

writes OUT_DIR/final.npz (the weights after N steps) and OUT_DIR/losses.json. With
`--eigen` the model's first convolution is XLA's own (Eigen's) instead of jaxrepro's
kernel (`eigen_convolutions`), for a comparison with Keras on TF's Eigen kernels.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from jaxrepro import cli, determinism, models, rng
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro.errors import UserError
from jaxrepro.tfref import weights
from jaxrepro.train import setup, steps
from jaxrepro.train.loop import data_steps_per_epoch, load_data
from jaxrepro.train.setup import TrainState


class MatchedError(UserError, ValueError):
    """Settings the matched protocol cannot run with."""


@dataclasses.dataclass(frozen=True)
class MatchedInputs:
    """What both frameworks start from and train on."""

    model: nn.Module  # the config's model with dropout off
    state: TrainState  # the initial state
    train_images: np.ndarray  # float32 [N, B, S, S, 3], augmented
    train_labels: np.ndarray  # float32 [N, B]
    probe_images: np.ndarray  # float32 [P, S, S, 3], validation, not augmented
    val_images: np.ndarray  # uint8 [V, S, S, 3]
    val_labels: np.ndarray  # int [V]


def matched_inputs(config: ml_collections.ConfigDict, num_steps: int, probe: int) -> MatchedInputs:
    """Initial state, N augmented batches, probe and validation images of `config`,
    computed in the config's determinism mode."""
    determinism.apply_config(config)  # before any JAX work: XLA reads its flags once
    data = load_data(config)
    n_train, bs = len(data.train.labels), config.batch_size
    steps_per_epoch = data_steps_per_epoch(data, bs)
    keys = setup.stream_keys(config)
    augment = jax.jit(lambda key, x: steps.augment_images(x, key, steps.augmentation(config)))
    xs, ys = [], []
    for step in range(num_steps):
        epoch, batch = divmod(step, steps_per_epoch)
        idx = datalib.batch_at(keys["shuffle"], epoch, batch, bs, n_train)
        x = augment(rng.step_key(keys["augment"], step), jnp.asarray(data.train.images[idx]))
        xs.append(np.asarray(jax.device_get(x), np.float32))
        ys.append(np.asarray(data.train.labels[idx], np.float32))
    model = setup.build_model(config, dropout_rate=0.0)
    state = setup.init_state(
        model, setup.build_optimizer(config), keys["init"], config.data.image_size
    )
    n_probe = min(probe, len(data.validation.labels))
    return MatchedInputs(
        model=model,
        state=state,
        train_images=np.stack(xs),
        train_labels=np.stack(ys),
        probe_images=data.validation.images[:n_probe].astype(np.float32),
        val_images=np.asarray(data.validation.images, np.uint8),
        val_labels=np.asarray(data.validation.labels),
    )


def matched_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    """The jitted step both halves mirror: `(state, x, y) -> (state, loss, grads)` on a
    pre-augmented batch, batch norm in training mode, no dropout."""

    @jax.jit
    def step(state: TrainState, x, y):
        g = steps.loss_and_grads(model, state.params, state.batch_stats, x, y)
        return steps.apply_gradients(tx, state, g.grads, g.batch_stats), g.loss, g.grads

    return step


def keras_layers(model: nn.Module) -> dict[str, Any]:
    """layers.json: the Keras layer of each sown activation and of Grad-CAM's A."""
    spec = models.spec_of(model)
    if spec is None:
        raise MatchedError(f"{type(model).__name__} has no Keras twin")
    return {"activations": spec.keras_layers(model), "gradcam_layer": spec.keras_gradcam_layer}


def write_exchange(inputs: MatchedInputs, directory: Path, *, validation: bool = True) -> None:
    """init.npz, inputs.npz and layers.json in `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights.save(directory / "init.npz", weights.flatten(jax.device_get(inputs.state.variables)))
    arrays = {
        "train_images": inputs.train_images,
        "train_labels": inputs.train_labels,
        "probe_images": inputs.probe_images,
    }
    if validation:
        arrays.update(val_images=inputs.val_images, val_labels=inputs.val_labels)
    with open(directory / "inputs.npz", "wb") as f:
        np.savez(f, **arrays)
    (directory / "layers.json").write_text(json.dumps(keras_layers(inputs.model), indent=1))


def eigen_convolutions(model: nn.Module) -> nn.Module:
    """`model` with XLA's own (Eigen's) first convolution instead of jaxrepro's kernel,
    where it has one. The ConvNet's convolutions then all run Eigen, the library Keras
    runs with oneDNN off; the mini Xception's depthwise and 1x1 convolutions keep the
    config's forms (`fast_convs`)."""
    if "first_conv" in {f.name for f in dataclasses.fields(model)}:
        return model.clone(first_conv=None)
    return model


def train_matched(
    config: ml_collections.ConfigDict, exchange: Path, out: Path, *, eigen: bool = False
) -> None:
    """N matched steps from the exchange's weights and batches, in the config's
    determinism mode; final weights to `out`. `eigen`: the first convolution as
    Eigen's (`eigen_convolutions`)."""
    determinism.apply_config(config)
    model, tx = setup.build_model(config, dropout_rate=0.0), setup.build_optimizer(config)
    if eigen:
        model = eigen_convolutions(model)
    variables = weights.unflatten(weights.load(exchange / "init.npz"))
    params = variables["params"]
    state = TrainState(
        step=jnp.int32(0),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )
    step = matched_step(model, tx)
    with np.load(exchange / "inputs.npz", allow_pickle=False) as data:
        xs, ys = data["train_images"], data["train_labels"]
    losses = []
    for k in range(xs.shape[0]):
        state, loss, _ = step(state, xs[k], ys[k])
        losses.append(float(loss))
    final = state.variables if state.batch_stats else {"params": state.params}
    out.mkdir(parents=True, exist_ok=True)
    weights.save(out / "final.npz", weights.flatten(jax.device_get(final)))
    (out / "losses.json").write_text(json.dumps(losses) + "\n")


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """The JAX trainer child: EXCHANGE_DIR OUT_DIR CONFIG_FILE [--eigen]
    [--config.KEY=VALUE ...]."""
    rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
    eigen = "--eigen" in rest
    rest = [a for a in rest if a != "--eigen"]
    if len(rest) != 3:
        raise MatchedError(
            "usage: python -m jaxrepro.analysis.matched EXCHANGE_DIR OUT_DIR "
            "CONFIG_FILE [--eigen] [--config.KEY=VALUE ...]"
        )
    exchange, out, config_file = rest
    train_matched(configlib.resolve(config_file, overrides), Path(exchange), Path(out), eigen=eigen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
