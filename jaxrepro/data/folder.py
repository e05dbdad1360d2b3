"""A local folder of cat and dog photos as a TFDS builder (`jaxrepro_folder`).

Why: the paper trained on Kaggle's dogs-vs-cats images. Users who have them as files
get them through the same path as every other source (a TFDS builder prepared once as
array_record, read back by random access), with the images already at `image_size`.

Accepted layouts (searched recursively, hidden entries ignored):

* Kaggle dogs-vs-cats: `train/cat.0.jpg`, `train/dog.12.jpg`, ... (the file name starts
  with `cat` or `dog` followed by `.`, `_`, `-` or a space);
* Microsoft PetImages: `PetImages/Cat/0.jpg`, `PetImages/Dog/7.jpg`, ... (the nearest
  parent folder is named cat(s) or dog(s), any case).

The file name wins over the folder. Image files without a label (Kaggle's `test1/`) are
counted and left out. Files that Pillow cannot decode (PetImages holds some) are
skipped; they are logged and listed in the prepared data set's `metadata.json`
(`skipped`), and `load()` returns them as `DataSplit.skipped`. Example ids are the
files' paths relative to the folder (`train/cat.0.jpg`), so the split does not depend
on where the folder lives.

Each folder state gets its own builder config, `<size>px_<digest>`, where the digest is
SHA-256 over the listing (relative path, label, byte size, modification time) of its
image files: editing the folder makes a new config instead of reusing stale data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import tensorflow_datasets as tfds

from jaxrepro.data.errors import DataError
from jaxrepro.data.images import DECODE_ERRORS, IMAGE_SUFFIXES, decode_rgb, encode_png, map_ordered
from jaxrepro.data.shapes import CLASS_NAMES

log = logging.getLogger(__name__)

_FOLDER_LABELS = {"cat": 0, "cats": 0, "dog": 1, "dogs": 1}
_NAME_RE = re.compile(r"^(cat|dog)[._\- ]", re.IGNORECASE)


def label_of(relpath: str) -> int | None:
    """0 (cat), 1 (dog) or None, from a relative path by the rules above."""
    path = PurePosixPath(relpath)
    m = _NAME_RE.match(path.name)
    if m:
        return CLASS_NAMES.index(m.group(1).lower())
    for part in reversed(path.parts[:-1]):
        if part.lower() in _FOLDER_LABELS:
            return _FOLDER_LABELS[part.lower()]
    return None


@dataclasses.dataclass(frozen=True)
class Listing:
    """The labelled image files of a folder, in sorted order, and a digest of them."""

    root: Path
    examples: tuple[tuple[str, int], ...]  # (relative posix path, label)
    unlabeled: tuple[str, ...]
    digest: str


def scan_folder(folder: str | os.PathLike) -> Listing:
    """List a folder's image files and their labels; raises DataError if it is missing."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    examples, unlabeled, lines = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            label = label_of(rel)
            st = full.stat()
            lines.append(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n")
            if label is None:
                unlabeled.append(rel)
            else:
                examples.append((rel, label))
    examples.sort()
    lines.sort()
    digest = hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    return Listing(root, tuple(examples), tuple(sorted(unlabeled)), digest)


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """A folder state at one image size (see `folder_config`)."""

    image_size: int = 180
    listing_sha256: str = ""


def folder_config(listing: Listing, image_size: int) -> FolderConfig:
    """The builder config of this folder listing at this image size."""
    return FolderConfig(
        name=f"{int(image_size)}px_{listing.digest[:16]}",
        image_size=int(image_size),
        listing_sha256=listing.digest,
        description=f"{len(listing.examples)} labelled images from {listing.root}, resized "
        f"to {image_size}x{image_size}.",
    )


def _prepare_one(
    root: Path, image_size: int, entry: tuple[str, int]
) -> tuple[str, int, bytes | None, str | None]:
    rel, label = entry
    try:
        pixels = decode_rgb((root / rel).read_bytes(), image_size)
    except DECODE_ERRORS as e:
        return rel, label, None, f"{type(e).__name__}: {e}"
    return rel, label, encode_png(pixels), None


class JaxreproFolder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over a local folder of cat/dog images (manual_dir = the folder)."""

    name = "jaxrepro_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder that holds the images as manual_dir: Kaggle dogs-vs-cats "
        "(train/cat.0.jpg, train/dog.0.jpg, ...) or Microsoft PetImages (Cat/0.jpg, "
        "Dog/0.jpg, ...). jaxrepro.data.load(source='folder', folder=...) does this."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

    def _generate_examples(self, folder: Path) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        listing = scan_folder(folder)
        if listing.digest != cfg.listing_sha256:
            raise DataError(
                f"the folder {listing.root} changed since its config was made "
                "(or another folder was passed as manual_dir); load it again"
            )
        skipped = []
        work = lambda entry: _prepare_one(listing.root, cfg.image_size, entry)  # noqa: E731
        for rel, label, png, error in map_ordered(work, listing.examples):
            if png is None:
                skipped.append({"path": rel, "error": error})
                continue
            yield rel, {"image": png, "label": label, "id": rel}
        self.info.metadata.update(
            {
                "folder": str(listing.root),
                "listing_sha256": listing.digest,
                "num_files": len(listing.examples) + len(listing.unlabeled),
                "num_unlabeled": len(listing.unlabeled),
                "skipped": skipped,
            }
        )
        if skipped:
            log.warning(
                "%d of %d images in %s could not be decoded and were skipped: %s%s",
                len(skipped),
                len(listing.examples),
                listing.root,
                ", ".join(s["path"] for s in skipped[:5]),
                " ..." if len(skipped) > 5 else "",
            )
