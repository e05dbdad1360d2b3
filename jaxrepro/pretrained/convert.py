"""A Keras weight file as a jaxrepro run directory of one Orbax checkpoint.

`import_weights(name, source, out)`:

1. sends the Flax module path of each weighted Keras layer (`ModelSpec.keras_weight_order`)
   to a TensorFlow process, which loads `source` into `keras.applications` and writes
   the weights as Flax-named arrays (`python -m jaxrepro.tfref pretrained`, an `.npz`
   read without pickle) with the source file's SHA-256;
2. checks every array against the Flax model's variables: the same names, shapes and
   dtypes, nothing missing, nothing left over (`WeightImportError`);
3. writes OUT/config.json (`imagenet_config`), OUT/pretrained.json (where the weights
   came from) and OUT/checkpoints/0 (`jaxrepro.train.checkpoint.save`, with its SHA-256
   manifest). A failure at any step leaves no run directory behind.

The arrays are the file's float32 values moved without arithmetic (the depthwise
kernels' axes swapped), so the checkpoint holds the file's bits.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxrepro import cli, models, provenance
from jaxrepro import config as configlib
from jaxrepro.errors import UserError
from jaxrepro.tfref import process, weights
from jaxrepro.train import checkpoint as ckpt
from jaxrepro.train import rundir, setup


class WeightImportError(UserError, ValueError):
    """A weight file that cannot be imported: unreadable, or for another network."""


def names() -> list[str]:
    """The registered pretrained networks ('inception_v3', 'vgg16', 'xception')."""
    return sorted(n for n, s in models.SPECS.items() if s.pretrained)


def spec(name: str) -> models.ModelSpec:
    """The spec of pretrained network `name` (WeightImportError listing the valid names)."""
    found = models.SPECS.get(name)
    if found is None or not found.pretrained:
        raise WeightImportError(f"unknown pretrained network {name!r}; valid: {names()}")
    return found


def imagenet_config(
    name: str, determinism: str = "machine", image_size: int | None = None
) -> ml_collections.ConfigDict:
    """The config of an imported network: the model, its input size (default: the one
    its ImageNet weights were trained at), no optimizer state."""
    s = spec(name)
    size = s.image_size if image_size is None else int(image_size)
    if size < s.min_image_size:
        raise WeightImportError(
            f"{name} takes images of at least {s.min_image_size} px, not {size}"
        )
    c = ml_collections.ConfigDict()
    c.experiment = f"{name}-imagenet"
    c.model = name
    c.determinism = determinism
    c.seed = 0  # nothing is drawn: the weights are the file's
    c.data = ml_collections.ConfigDict(dict(source="imagenet", image_size=size))
    c.optimizer = ml_collections.ConfigDict(dict(name="frozen"))
    c.eval_batch_size = 16
    return c


def abstract_variables(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Flat name -> ShapeDtypeStruct of the model's params and batch_stats."""
    state = setup.abstract_state(config)
    tree = {"params": state.params, "batch_stats": state.batch_stats}
    return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def check_arrays(flat: dict[str, np.ndarray], expected: dict[str, Any]) -> None:
    """Raise WeightImportError unless `flat` has exactly `expected`'s names, shapes and dtypes."""
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = sorted(
        f"{k}: {flat[k].dtype}{list(flat[k].shape)}, expected "
        f"{np.dtype(expected[k].dtype)}{list(expected[k].shape)}"
        for k in set(flat) & set(expected)
        if tuple(flat[k].shape) != tuple(expected[k].shape)
        or flat[k].dtype != np.dtype(expected[k].dtype)
    )
    if missing or extra or wrong:
        parts = [
            f"{len(missing)} missing ({', '.join(missing[:4])})" if missing else "",
            f"{len(extra)} not in the model ({', '.join(extra[:4])})" if extra else "",
            f"{len(wrong)} of another shape ({'; '.join(wrong[:4])})" if wrong else "",
        ]
        raise WeightImportError("the weights do not fit: " + ", ".join(p for p in parts if p))


def keras_arrays(
    name: str, source: str | Path, workdir: Path, image_size: int, timeout: float | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(Flax-named arrays, record) of `source`, converted in a TensorFlow process that
    builds the Keras network at `image_size`."""
    s = spec(name)
    order = workdir / "order.json"
    order.write_text(json.dumps(s.keras_weight_order(s.module())))
    out = workdir / "weights.npz"
    try:
        r = cli.run_child(
            "jaxrepro.tfref",
            [
                "pretrained",
                s.keras_application,
                str(order),
                str(source),
                str(out),
                "--image-size",
                str(image_size),
            ],
            env=process.child_environment(process.Recipe(deterministic=False)),
            timeout=timeout,
            what="the Keras process",
        )
    except cli.ChildError as e:
        if e.returncode == cli.EXIT_USER_ERROR:  # the file's fault: Keras said why
            lines = str(e).splitlines()
            starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
            message = "\n".join(lines[starts[-1] :] if starts else lines)
            message = message.removeprefix("error: ").strip()
            raise WeightImportError(message) from None
        raise
    return weights.load(out), json.loads(r.stdout)


def import_weights(
    name: str,
    source: str | Path,
    out: str | Path,
    *,
    determinism: str = "machine",
    image_size: int | None = None,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> Path:
    """Import Keras weight file `source` of network `name` as run directory `out`.

    `image_size`: the input size the network is built at (default its ImageNet size).
    Only VGG-16's weights depend on it (its dense head sees the flattened last map)."""
    source, out = Path(source), Path(out)
    config = imagenet_config(name, determinism, image_size)
    if not source.is_file():
        raise WeightImportError(f"no such file: {source}")
    if (out / "config.json").exists():
        if not overwrite:
            raise WeightImportError(f"{out} already holds a run; pass --overwrite or another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightImportError(f"{out} exists and is not a run directory; choose another --out")
    with tempfile.TemporaryDirectory(prefix="jaxrepro-import-") as tmp:
        flat, record = keras_arrays(name, source, Path(tmp), int(config.data.image_size))
    check_arrays(flat, abstract_variables(config))
    tree = weights.unflatten(flat)
    params = jax.tree.map(jnp.asarray, tree["params"])
    batch_stats = jax.tree.map(jnp.asarray, tree.get("batch_stats", {}))
    state = setup.TrainState(
        step=jnp.int32(0),
        params=params,
        batch_stats=batch_stats,
        opt_state=setup.build_optimizer(config).init(params),
    )
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    run = rundir.RunDir(staging)
    staging.mkdir(parents=True)
    try:
        run.config.write_text(configlib.to_json(config) + "\n")
        info = {
            **record,
            "network": name,
            "weights_sha256": weights.sha256(flat),
            "provenance": provenance.record("python -m jaxrepro.pretrained", argv or []),
        }
        (staging / "pretrained.json").write_text(json.dumps(info, indent=2) + "\n")
        mngr = run.manager(max_to_keep=None)
        ckpt.save(mngr, 0, state, {"source_sha256": record["source_sha256"]})
        mngr.close()
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def default_out(name: str) -> Path:
    """`checkpoints/<name>-imagenet` under the current directory."""
    return Path("checkpoints") / f"{name}-imagenet"
