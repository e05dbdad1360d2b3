"""Data sources by name, and `load()`: one split of one source as in-memory numpy arrays.

Why: the trainer and the explanation tools want the same few thousand images as plain
arrays, chosen by a rule that does not depend on storage order, whichever source they
come from. Each source is opened as a prepared TFDS builder (array_record, random
access); `load` then reads ids and labels of all examples, applies the split rule
(`jaxrepro.data.split`) and decodes only the examples of the requested split.

Sources (`SOURCES`):

* `shapes`: the embedded set (`jaxrepro.data.shapes`), generated into `data_dir` on
  first use (TFDS shows progress);
* `cats_vs_dogs`: the TFDS `cats_vs_dogs` builder, if a user has prepared it as
  array_record (never downloaded here). Its images have their original sizes; they are
  resized to `image_size` by `jaxrepro.data.images.decode_rgb` when loaded;
* `folder`: a local Kaggle/PetImages folder (`jaxrepro.data.folder`), prepared once
  into `data_dir` with the images resized by the same rule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants

from jaxrepro.data import folder as folderlib
from jaxrepro.data import shapes
from jaxrepro.data.errors import DataError
from jaxrepro.data.images import decode_rgb, map_ordered, stack
from jaxrepro.data.split import SPLITS, partition

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 180
_READ_CHUNK = 256


def default_data_dir() -> Path:
    """Where jaxrepro prepares TFDS data: $JAXREPRO_DATA_DIR, else ./data/tfds (under the
    current directory, like the run directories in ./checkpoints)."""
    env = os.environ.get("JAXREPRO_DATA_DIR")
    return (Path(env).expanduser() if env else Path("data") / "tfds").absolute()


@dataclasses.dataclass(frozen=True, eq=False)
class DataSplit:
    """One split in memory, in its canonical order (see `jaxrepro.data.split`).

    images uint8 [N, S, S, 3]; labels int32 [N] (0 cat, 1 dog); masks uint8 [N, S, S]
    (1 on the object) or None where the source has none; ids: example ids.
    `provenance` says where the data came from (builder, config, version, directory,
    skipped files); it is informative and not part of the data fingerprint.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    ids: list[str]
    source: str
    split: str
    image_size: int
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def skipped(self) -> list[dict]:
        """Files the source could not decode and left out (folder source)."""
        return list(self.provenance.get("skipped", []))


@dataclasses.dataclass(frozen=True)
class Opened:
    """A prepared TFDS builder and how to read it."""

    builder: Any  # tfds.core.DatasetBuilder
    id_feature: str  # feature holding the example id
    mask_feature: str | None  # feature holding the mask, if any
    stored_size: int | None  # side of the stored images, None if they vary
    provenance: dict


Opener = Callable[..., Opened]
SOURCES: dict[str, Opener] = {}


def register_source(name: str) -> Callable[[Opener], Opener]:
    """Decorator: make an opener selectable as `load(source=name)`."""

    def wrap(fn: Opener) -> Opener:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        SOURCES[name] = fn
        return fn

    return wrap


def _download_config(**kwargs: Any) -> Any:
    return tfds.download.DownloadConfig(try_download_gcs=False, **kwargs)


def _provenance(builder: Any, data_dir: Path) -> dict:
    return {
        "builder": builder.name,
        "config": builder.builder_config_name,
        "version": str(builder.version),
        "data_dir": str(data_dir),
        "path": str(builder.data_path),
        "num_examples": builder.info.splits["train"].num_examples,
    }


def _reject(source: str, **given: Any) -> None:
    extra = [k for k, v in given.items() if v is not None]
    if extra:
        raise DataError(f"source {source!r} does not take {', '.join(extra)}")


@register_source("shapes")
def open_shapes(
    *,
    image_size: int | None,
    num_needed: int,
    data_dir: str | None,
    folder: str | None,
    builder_config: Any,
) -> Opened:
    """The embedded shapes set; generated into data_dir on first use.

    builder_config: None (pick by image_size: a named config of that size with enough
    examples, else a custom `s<size>_n<count>` one), a config name ("default", "tiny"),
    or a `ShapesConfig`.
    """
    _reject("shapes", folder=folder)
    if builder_config is None:
        config = shapes.config_for(image_size or DEFAULT_IMAGE_SIZE, num_needed)
    elif isinstance(builder_config, str):
        named = {c.name: c for c in shapes.BUILDER_CONFIGS}
        if builder_config not in named:
            raise DataError(
                f"unknown shapes builder config {builder_config!r}; valid: {sorted(named)}"
            )
        config = named[builder_config]
    else:
        config = builder_config
    if image_size is not None and image_size != config.image_size:
        raise DataError(
            f"shapes config {config.name!r} has {config.image_size}x"
            f"{config.image_size} images but image_size={image_size} was asked; "
            "leave builder_config unset to pick a config of that size"
        )
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    builder = shapes.JaxreproShapes(data_dir=os.fspath(root), config=config)
    if not builder.is_prepared():
        log.info("generating %s/%s into %s", builder.name, config.name, root)
        builder.download_and_prepare(file_format="array_record", download_config=_download_config())
    return Opened(builder, "id", "mask", config.image_size, _provenance(builder, root))


@register_source("cats_vs_dogs")
def open_cats_vs_dogs(
    *,
    image_size: int | None,
    num_needed: int,
    data_dir: str | None,
    folder: str | None,
    builder_config: Any,
) -> Opened:
    """TFDS cats_vs_dogs, prepared by the user as array_record (never downloaded here).

    Without data_dir it looks in jaxrepro's data dir, then in TFDS's default
    ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    del image_size, num_needed
    _reject("cats_vs_dogs", folder=folder, builder_config=builder_config)

    if data_dir:
        roots = [Path(data_dir).expanduser()]
    else:
        roots = list(
            dict.fromkeys([default_data_dir(), Path(constants.get_default_data_dir()).expanduser()])
        )
    looked = []
    for root in roots:
        builder = tfds.builder("cats_vs_dogs", data_dir=os.fspath(root))
        looked.append(str(builder.data_path))
        if not builder.is_prepared():
            continue
        formats = {f.value for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            raise DataError(
                f"TFDS cats_vs_dogs at {builder.data_path} is prepared as "
                f"{', '.join(sorted(formats)) or 'an unknown format'}, which can only be read "
                "through TensorFlow. jaxrepro reads TFDS data by random access, which needs "
                "array_record: prepare it again with `tfds build cats_vs_dogs "
                f"--data_dir={root} --file_format=array_record` (needs TensorFlow and a "
                "network once), or use source='folder' with the extracted images."
            )
        return Opened(builder, "image/filename", None, None, _provenance(builder, root))
    raise DataError(
        "TFDS cats_vs_dogs is not prepared; looked in: " + ", ".join(looked) + ". jaxrepro "
        "never downloads data. Prepare it where a network and TensorFlow are available: "
        "`tfds build cats_vs_dogs --data_dir=DIR --file_format=array_record`, then pass "
        "data_dir=DIR (config: --config.data.data_dir=DIR); or use source='folder' with "
        "a local copy of the Kaggle or PetImages images."
    )


@register_source("folder")
def open_folder(
    *,
    image_size: int | None,
    num_needed: int,
    data_dir: str | None,
    folder: str | None,
    builder_config: Any,
) -> Opened:
    """A local folder of images (Kaggle or PetImages layout), prepared into data_dir."""
    del num_needed
    _reject("folder", builder_config=builder_config)
    if not folder:
        raise DataError(
            "source 'folder' needs folder=PATH (config: --config.data.folder=PATH), "
            "a folder of images such as train/cat.0.jpg or PetImages/Cat/0.jpg"
        )
    listing = folderlib.scan_folder(folder)
    if not listing.examples:
        raise DataError(
            f"no labelled images found under {listing.root} (expected files such "
            "as train/cat.0.jpg, train/dog.0.jpg, or Cat/0.jpg, Dog/0.jpg)"
        )
    size = image_size or DEFAULT_IMAGE_SIZE
    config = folderlib.folder_config(listing, size)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    builder = folderlib.JaxreproFolder(data_dir=os.fspath(root), config=config)
    if not builder.is_prepared():
        log.info("preparing %d images from %s into %s", len(listing.examples), listing.root, root)
        builder.download_and_prepare(
            file_format="array_record", download_config=_download_config(manual_dir=listing.root)
        )
    provenance = _provenance(builder, root)
    provenance.update(builder.info.metadata or {})
    if provenance.get("skipped"):
        log.warning(
            "%d unreadable images of %s were skipped (listed in %s/metadata.json)",
            len(provenance["skipped"]),
            listing.root,
            builder.data_path,
        )
    return Opened(builder, "id", None, size, provenance)


def _read(source: Sequence, indices: Sequence[int]) -> Iterator[dict]:
    """Records at `indices`, fetched in chunks (array_record reads them in parallel)."""
    for start in range(0, len(indices), _READ_CHUNK):
        yield from source.__getitems__([int(i) for i in indices[start : start + _READ_CHUNK]])


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _index(
    source: str,
    image_size: int | None,
    num_train: int,
    num_val: int,
    data_dir,
    folder,
    builder_config,
) -> tuple[Opened, list[str], np.ndarray, dict[str, np.ndarray], int]:
    """Open a source and apply the split rule: (opened, ids, labels, partition, size)."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; valid sources: {sorted(SOURCES)}")

    opened = SOURCES[source](
        image_size=image_size,
        num_needed=num_train + num_val,
        data_dir=os.fspath(data_dir) if data_dir else None,
        folder=os.fspath(folder) if folder else None,
        builder_config=builder_config,
    )
    size = image_size or opened.stored_size or DEFAULT_IMAGE_SIZE
    skip = {"image": tfds.decode.SkipDecoding()}
    if opened.mask_feature:
        skip[opened.mask_feature] = tfds.decode.SkipDecoding()
    meta_source = opened.builder.as_data_source(split="train", decoders=skip)
    ids: list[str] = []
    labels_list: list[int] = []
    for record in _read(meta_source, range(len(meta_source))):  # keeps only id and label
        ids.append(_text(record[opened.id_feature]))
        labels_list.append(int(record["label"]))
    labels = np.asarray(labels_list, dtype=np.int32)
    try:
        parts = partition(ids, labels, num_train, num_val)
    except DataError as e:
        raise DataError(
            f"{source}: {e} ({len(ids)} examples at {opened.provenance.get('path')})"
        ) from e
    return opened, ids, labels, parts, size


def _materialise(
    source: str,
    split: str,
    opened: Opened,
    ids: list[str],
    labels: np.ndarray,
    chosen: np.ndarray,
    size: int,
) -> DataSplit:
    """Decode the chosen examples of a split into arrays."""

    # Images are decoded here, by Pillow, with the one resize rule; masks by TFDS.
    data_source = opened.builder.as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}
    )
    records = list(_read(data_source, chosen))
    images = stack(
        map_ordered(lambda r: decode_rgb(r["image"], size), records), len(records), (size, size, 3)
    )
    masks = None
    if opened.mask_feature:
        masks = stack(
            (np.asarray(r[opened.mask_feature], dtype=np.uint8) for r in records),
            len(records),
            (size, size),
        )
    return DataSplit(
        images=images,
        labels=labels[chosen],
        masks=masks,
        ids=[ids[i] for i in chosen],
        source=source,
        split=split,
        image_size=size,
        provenance=opened.provenance,
    )


def load(
    source: str = "shapes",
    split: str = "train",
    *,
    image_size: int | None = None,
    num_train: int = 2000,
    num_val: int = 1000,
    data_dir: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    builder_config: Any = None,
) -> DataSplit:
    """One split of a source, in memory (see the package docstring for the arguments)."""
    if source in SOURCES and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    opened, ids, labels, parts, size = _index(
        source, image_size, num_train, num_val, data_dir, folder, builder_config
    )
    return _materialise(source, split, opened, ids, labels, parts[split], size)


def load_splits(
    source: str = "shapes",
    *,
    image_size: int | None = None,
    num_train: int = 2000,
    num_val: int = 1000,
    data_dir: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    builder_config: Any = None,
) -> dict[str, DataSplit]:
    """Both splits ({"train": ..., "validation": ...}), opening and indexing the source once."""
    opened, ids, labels, parts, size = _index(
        source, image_size, num_train, num_val, data_dir, folder, builder_config
    )
    return {
        name: _materialise(source, name, opened, ids, labels, parts[name], size) for name in SPLITS
    }


def prepare_config_data(data: Mapping[str, Any]) -> None:
    """Open a config's `data` source without loading it, generating or preparing it on
    first use: processes started next then find it ready instead of all building it at
    once (TFDS's final rename fails for all but one of them)."""
    _index(
        data["source"],
        data["image_size"],
        data["num_train"],
        data["num_val"],
        data["data_dir"] or None,
        data["folder"] or None,
        None,
    )


def load_config_splits(data: Mapping[str, Any]) -> dict[str, DataSplit]:
    """Both splits named by a config's `data` block (what every trainer reads)."""
    return load_splits(
        data["source"],
        image_size=data["image_size"],
        num_train=data["num_train"],
        num_val=data["num_val"],
        data_dir=data["data_dir"] or None,
        folder=data["folder"] or None,
    )
