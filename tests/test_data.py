"""The data pipeline: TFDS builders, the hash split, the epoch order, fingerprints.

Everything runs on the "tiny" shapes config (96 images at 32x32) and a few hand-made
image files, built into pytest's temporary directories.
"""

import hashlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config
from PIL import Image

import jaxrepro.data as data
from jaxrepro.data import order, shapes
from jaxrepro.data.images import decode_rgb

TINY = dict(image_size=32, num_train=64, num_val=32, builder_config="tiny")


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _rng(*seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(seed))))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tfds_a")
    data.load("shapes", "train", data_dir=root, **TINY)  # builds on first use
    return root


@pytest.fixture(scope="session")
def tiny_splits(tiny_dir) -> dict:
    return data.load_splits("shapes", data_dir=tiny_dir, **TINY)


def _raw_records(root: Path) -> list[bytes]:
    builder = shapes.JaxreproShapes(data_dir=str(root), config="tiny")
    ds = builder.as_data_source("train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    return [bytes(ds[i]) for i in range(len(ds))]


# ------------------------------------------------------------------- shapes builder


def test_builder_prepares_array_record_and_reads_by_random_access(tiny_dir):
    builder = shapes.JaxreproShapes(data_dir=str(tiny_dir), config="tiny")
    assert builder.is_prepared()
    assert builder.info.file_format.value == "array_record"
    assert list(builder.info.splits) == ["train"]
    ds = builder.as_data_source("train")
    assert len(ds) == 96
    for i in (77, 3, 50):  # random access, in no particular order
        ex = ds[i]
        index = int(ex["id"].decode().removeprefix(shapes.ID_PREFIX))
        want = shapes.render_example(shapes.DEFAULT_SEED, index, 32)
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
        assert np.array_equal(ex["image"], want["image"])
        assert np.array_equal(ex["mask"], want["mask"])
        assert int(ex["label"]) == want["label"] == index % 2


def test_two_independent_builds_are_bitwise_identical(tiny_dir, tmp_path):
    data.load("shapes", "validation", data_dir=tmp_path, **TINY)
    a, b = _raw_records(tiny_dir), _raw_records(tmp_path)
    assert len(a) == len(b) == 96
    assert [hashlib.sha256(r).hexdigest() for r in a] == [hashlib.sha256(r).hexdigest() for r in b]
    # And the decoded splits agree bit for bit.
    for name in data.SPLITS:
        x = data.load("shapes", name, data_dir=tiny_dir, **TINY)
        y = data.load("shapes", name, data_dir=tmp_path, **TINY)
        assert data.data_fingerprint(x) == data.data_fingerprint(y)
        assert _sha(x.images, x.masks) == _sha(y.images, y.masks)


def test_example_is_identical_in_another_process(tiny_dir):
    code = (
        "import hashlib, numpy as np, jaxrepro\n"
        "from jaxrepro.data import shapes\n"
        "ex = shapes.render_example(0, 7, 32)\n"
        "print(hashlib.sha256(ex['image'].tobytes() + ex['mask'].tobytes()).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout.split()[-1]
    here = shapes.render_example(0, 7, 32)
    assert out == hashlib.sha256(here["image"].tobytes() + here["mask"].tobytes()).hexdigest()
    ds = shapes.JaxreproShapes(data_dir=str(tiny_dir), config="tiny").as_data_source("train")
    stored = next(ds[i] for i in range(len(ds)) if ds[i]["id"] == b"shapes-000007")
    assert out == hashlib.sha256(stored["image"].tobytes() + stored["mask"].tobytes()).hexdigest()


# Fingerprints of the tiny set as generated when jaxrepro_shapes 1.0.0 was written. A
# different value means different pixels: another NumPy/Pillow version, a CPU whose
# arithmetic differs, or a change to the drawing code (then bump JaxreproShapes.VERSION
# and record the new values here).
TINY_FINGERPRINTS = {
    "train": "f5fa7768740eb5a460c89251f04b8c3367310cf064a76d2a86c6e39d2e704b8f",
    "validation": "68357c4af27e9c5e4a989d428f9763511c85c7503f6b2d83def34a3ee51547e8",
}


def test_tiny_set_matches_its_recorded_fingerprints(tiny_splits):
    assert {k: data.data_fingerprint(v) for k, v in tiny_splits.items()} == TINY_FINGERPRINTS


def test_examples_depend_on_seed_and_index():
    base = shapes.render_example(0, 4, 32)["image"]
    assert not np.array_equal(base, shapes.render_example(0, 6, 32)["image"])
    assert not np.array_equal(base, shapes.render_example(1, 4, 32)["image"])
    assert np.array_equal(base, shapes.render_example(0, 4, 32)["image"])


def test_labels_balanced_and_masks_sane(tiny_splits):
    for name, split in tiny_splits.items():
        n = len(split)
        assert n == (64 if name == "train" else 32)
        assert split.labels.dtype == np.int32 and int(split.labels.sum()) == n // 2
        assert split.images.shape == (n, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.masks.shape == (n, 32, 32) and split.masks.dtype == np.uint8
        assert set(np.unique(split.masks)) <= {0, 1}
        area = split.masks.reshape(n, -1).mean(axis=1)
        assert (area > 0.02).all() and (area < 0.6).all()  # an object, not the frame
        # The object lies inside the image: the mask never covers a whole border row/column.
        for m in split.masks:
            assert not (m[0].all() or m[-1].all() or m[:, 0].all() or m[:, -1].all())


def test_mask_marks_the_object_not_the_background():
    ex = shapes.render_example(0, 11, 64)
    scene = shapes.sample_scene(0, 11)
    img, mask = ex["image"].astype(float), ex["mask"].astype(bool)
    # Inside the mask, pixels are near the object colours; the mask's centre is the head.
    cy, cx = (int(v * 64) for v in (scene.object_parts[-1].cy, scene.object_parts[-1].cx))
    assert mask[cy, cx]
    body = np.asarray(scene.object_parts[-1].color) * 255
    assert np.abs(img[cy, cx] - body).max() < 0.45 * 255
    # Clutter and background are outside the mask.
    assert mask.sum() < mask.size / 2


def test_config_selection_by_size():
    assert shapes.config_for(180, 3000).name == "default"
    assert shapes.config_for(32, 96).name == "tiny"
    custom = shapes.config_for(32, 200)
    assert (custom.name, custom.image_size, custom.num_examples) == ("s32_n3000", 32, 3000)
    assert shapes.config_for(80, 96).name == "s80_n96"  # the tiny scenes at 80 px
    assert shapes.config_for(64, 5001).num_examples == 5002  # even: balanced
    with pytest.raises(data.DataError, match="32x32"):
        data.load("shapes", "train", image_size=180, builder_config="tiny", data_dir="/nonexistent")
    with pytest.raises(data.DataError, match="valid"):
        data.load("shapes", "train", builder_config="huge", data_dir="/nonexistent")


def test_other_sizes_draw_the_same_scenes(tiny_dir, tiny_splits):
    big = data.load(
        "shapes", "validation", image_size=48, num_train=64, num_val=32, data_dir=tiny_dir
    )
    small = tiny_splits["validation"]
    assert big.provenance["config"] == "s48_n96" and big.images.shape[1:] == (48, 48, 3)
    assert big.ids == small.ids and np.array_equal(big.labels, small.labels)
    for m48, m32 in zip(big.masks, small.masks):  # the same object, drawn finer
        down = np.asarray(Image.fromarray(m48 * 255).resize((32, 32), Image.Resampling.BOX)) > 127
        inter, union = (down & (m32 > 0)).sum(), (down | (m32 > 0)).sum()
        assert inter / union > 0.7


def test_too_few_examples_is_a_clear_error(tiny_dir):
    with pytest.raises(data.DataError, match="class 0 has 48 examples"):
        data.load(
            "shapes",
            "train",
            image_size=32,
            num_train=80,
            num_val=32,
            builder_config="tiny",
            data_dir=tiny_dir,
        )


# ------------------------------------------------------------------------ split rule


def test_split_rule_is_stable_disjoint_balanced_and_storage_independent():
    ids = [f"img-{i}" for i in range(60)]
    labels = np.arange(60) % 2
    parts = data.partition(ids, labels, num_train=20, num_val=10)
    train, val = ([ids[i] for i in parts[k]] for k in ("train", "validation"))
    assert len(train) == 20 and len(val) == 10 and not set(train) & set(val)
    assert labels[parts["train"]].sum() == 10 and labels[parts["validation"]].sum() == 5
    # Canonical order is the SHA-256 order of the ids.
    assert train == sorted(train, key=lambda s: hashlib.sha256(s.encode()).digest())
    # Per class, train is the first hash-ordered block and validation the next one.
    for c in (0, 1):
        ranked = sorted(
            (s for s, label in zip(ids, labels) if label == c),
            key=lambda s: hashlib.sha256(s.encode()).digest(),
        )
        assert set(ranked[:10]) == {s for s in train if int(s[4:]) % 2 == c}
        assert set(ranked[10:15]) == {s for s in val if int(s[4:]) % 2 == c}
    # Shuffled storage order: the same ids, in the same order, in each split.
    perm = _rng(5).permutation(60)
    ids2, labels2 = [ids[i] for i in perm], labels[perm]
    parts2 = data.partition(ids2, labels2, num_train=20, num_val=10)
    assert [ids2[i] for i in parts2["train"]] == train
    assert [ids2[i] for i in parts2["validation"]] == val
    # Growing validation keeps the training split as it was.
    assert [ids[i] for i in data.partition(ids, labels, 20, 20)["train"]] == train


def test_split_rule_errors():
    ids, labels = [f"{i}" for i in range(10)], np.arange(10) % 2
    with pytest.raises(data.SplitError, match="multiple of 2"):
        data.partition(ids, labels, 3, 2)
    with pytest.raises(data.SplitError, match="need 6 of each class"):
        data.partition(ids, labels, 8, 4)
    with pytest.raises(data.SplitError, match="unique"):
        data.partition(["a", "a"], [0, 1], 2, 0)


def test_loaded_splits_follow_the_rule(tiny_splits):
    train, val = tiny_splits["train"], tiny_splits["validation"]
    assert not set(train.ids) & set(val.ids)
    for split in (train, val):
        assert split.ids == sorted(split.ids, key=data.split_key)
        for i, ex_id in enumerate(split.ids[:5]):
            want = shapes.render_example(0, int(ex_id.removeprefix(shapes.ID_PREFIX)), 32)
            assert np.array_equal(split.images[i], want["image"])
            assert split.labels[i] == want["label"]


# ----------------------------------------------------------------------- epoch order


def test_epoch_order_is_a_pure_permutation_per_epoch():
    key = jax.random.key(3)
    o0 = data.epoch_order(key, 0, 50)
    assert o0.dtype == np.int32 and np.array_equal(np.sort(o0), np.arange(50))
    order._cached_order.cache_clear()
    assert np.array_equal(data.epoch_order(jax.random.key(3), 0, 50), o0)  # recomputed
    want = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(3), 0), 50))
    assert np.array_equal(o0, want)
    o1 = data.epoch_order(key, 1, 50)
    assert not np.array_equal(o0, o1) and np.array_equal(np.sort(o1), np.arange(50))
    assert not np.array_equal(o0, data.epoch_order(jax.random.key(4), 0, 50))
    raw = jax.random.PRNGKey(3)  # raw uint32 keys work too
    assert np.array_equal(
        data.epoch_order(raw, 2, 50),
        np.asarray(jax.random.permutation(jax.random.fold_in(raw, 2), 50)),
    )
    with pytest.raises(ValueError):
        o0[0] = 1  # read-only: the memoised order cannot be changed by a caller


def test_batches_are_full_and_match_the_order():
    key = jax.random.key(0)
    o = data.epoch_order(key, 2, 50)
    batches = list(data.batch_indices(o, 16))
    assert len(batches) == data.num_batches(50, 16) == 3
    assert all(len(b) == 16 for b in batches)
    assert np.array_equal(np.concatenate(batches), o[:48])  # the last 2 are dropped
    for b in range(3):
        assert np.array_equal(data.batch_at(key, 2, b, 16, 50), batches[b])
    with pytest.raises(IndexError):
        data.batch_at(key, 2, 3, 16, 50)


# ---------------------------------------------------------------------- fingerprints


def test_data_fingerprint_sees_every_byte(tiny_splits):
    split = tiny_splits["validation"]
    fp = data.data_fingerprint(split)
    assert len(fp) == 64
    assert fp == data.data_fingerprint(split.images, split.labels, split.ids, split.masks)
    images = split.images.copy()
    images[5, 3, 4, 2] ^= 1
    assert data.data_fingerprint(images, split.labels, split.ids, split.masks) != fp
    labels = split.labels.copy()
    labels[0] = 1 - labels[0]
    assert data.data_fingerprint(split.images, labels, split.ids, split.masks) != fp
    swapped = np.r_[[1, 0], np.arange(2, len(split))]
    assert (
        data.data_fingerprint(
            split.images[swapped],
            split.labels[swapped],
            [split.ids[i] for i in swapped],
            split.masks[swapped],
        )
        != fp
    )
    assert data.data_fingerprint(split.images, split.labels, split.ids) != fp  # no masks


def test_order_fingerprint():
    key = jax.random.key(1)
    fp = data.order_fingerprint(key, 3, 40)
    assert fp == data.order_fingerprint(jax.random.key(1), 3, 40)
    assert fp != data.order_fingerprint(key, 2, 40)
    assert fp != data.order_fingerprint(jax.random.key(2), 3, 40)
    assert fp != data.order_fingerprint(key, 3, 41)


# --------------------------------------------------------------------- folder source


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    h, w = int(rng.integers(20, 50)), int(rng.integers(20, 50))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def test_folder_kaggle_layout_skips_and_reports_corrupt_files(tmp_path, caplog):
    folder, rng = tmp_path / "dogs-vs-cats", _rng(1)
    for i in range(6):
        for animal in ("cat", "dog"):
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            _write(folder / "train" / f"{animal}.{i}.jpg", _image_bytes(rng, fmt))
    _write(folder / "train" / "cat.99.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG")  # corrupt
    _write(folder / "test1" / "1.jpg", _image_bytes(rng, "JPEG"))  # unlabeled
    with caplog.at_level(logging.WARNING):
        train = data.load(
            "folder",
            "train",
            image_size=16,
            num_train=8,
            num_val=4,
            folder=folder,
            data_dir=tmp_path / "tfds",
        )
    assert [s["path"] for s in train.skipped] == ["train/cat.99.jpg"]
    assert "cat.99.jpg" in caplog.text
    assert train.provenance["num_unlabeled"] == 1
    assert train.masks is None and train.images.shape == (8, 16, 16, 3)
    assert int(train.labels.sum()) == 4
    for ex_id, image, label in zip(train.ids, train.images, train.labels):
        assert label == (0 if Path(ex_id).name.startswith("cat.") else 1)
        assert np.array_equal(image, decode_rgb((folder / ex_id).read_bytes(), 16))
    val = data.load(
        "folder",
        "validation",
        image_size=16,
        num_train=8,
        num_val=4,
        folder=folder,
        data_dir=tmp_path / "tfds",
    )
    assert len(val) == 4 and not set(val.ids) & set(train.ids)
    assert val.skipped == train.skipped  # read back from the prepared data set
    assert "train/cat.99.jpg" not in train.ids + val.ids
    # A changed folder is a new builder config, never stale data.
    _write(folder / "train" / "dog.6.jpg", _image_bytes(rng, "JPEG"))
    again = data.load(
        "folder",
        "train",
        image_size=16,
        num_train=8,
        num_val=4,
        folder=folder,
        data_dir=tmp_path / "tfds",
    )
    assert again.provenance["config"] != train.provenance["config"]


def test_folder_petimages_layout(tmp_path):
    folder, rng = tmp_path / "PetImages", _rng(2)
    for i in range(3):
        _write(folder / "Cat" / f"{i}.jpg", _image_bytes(rng, "JPEG"))
        _write(folder / "Dog" / f"{i}.jpg", _image_bytes(rng, "JPEG"))
    _write(folder / "Cat" / "Thumbs.db", b"not an image, not an image suffix")
    split = data.load(
        "folder",
        "train",
        image_size=8,
        num_train=4,
        num_val=2,
        folder=folder,
        data_dir=tmp_path / "tfds",
    )
    assert split.skipped == []
    assert sorted(split.labels.tolist()) == [0, 0, 1, 1]
    for ex_id, label in zip(split.ids, split.labels):
        assert ex_id.split("/")[0] == ("Cat" if label == 0 else "Dog")


def test_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="folder=PATH"):
        data.load("folder", "train")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load("folder", "train", folder=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no labelled images"):
        data.load("folder", "train", folder=tmp_path / "empty")


# --------------------------------------------------------------- cats_vs_dogs source


def test_cats_vs_dogs_not_prepared_names_the_data_dir(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load("cats_vs_dogs", "train", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "file_format=array_record" in message


class _FakeCatsVsDogs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A few images in TFDS cats_vs_dogs' layout (features, name, version)."""

    name = "cats_vs_dogs"
    VERSION = tfds.builder_cls("cats_vs_dogs").VERSION

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(),
                    "image/filename": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["cat", "dog"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = _rng(3)
        for i in range(8):
            name = f"PetImages/{('Cat', 'Dog')[i % 2]}/{i}.jpg"
            yield name, {"image": _image_bytes(rng, "JPEG"), "image/filename": name, "label": i % 2}


def test_cats_vs_dogs_reads_array_record_and_resizes(tmp_path):
    _FakeCatsVsDogs(data_dir=str(tmp_path)).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    split = data.load(
        "cats_vs_dogs", "train", image_size=12, num_train=4, num_val=2, data_dir=tmp_path
    )
    assert split.images.shape == (4, 12, 12, 3) and split.masks is None
    assert all(i.startswith("PetImages/") for i in split.ids)
    assert sorted(split.labels.tolist()) == [0, 0, 1, 1]


def test_cats_vs_dogs_prepared_as_tfrecord_is_refused(tmp_path):
    builder = _FakeCatsVsDogs(data_dir=str(tmp_path))
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    # Pretend it was prepared as tfrecord (writing real tfrecords needs TensorFlow).
    info_path = Path(builder.data_dir) / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info.pop("alternativeFileFormats", None)
    info_path.write_text(json.dumps(info))
    with pytest.raises(data.DataError, match="tfrecord.*array_record"):
        data.load("cats_vs_dogs", "train", image_size=12, num_train=4, num_val=2, data_dir=tmp_path)


# ------------------------------------------------------------------------- registry


def test_unknown_source_lists_valid_names():
    with pytest.raises(data.DataError) as err:
        data.load("imagenet", "train")
    for name in ("shapes", "cats_vs_dogs", "folder"):
        assert name in str(err.value)
    assert sorted(data.SOURCES) == ["cats_vs_dogs", "folder", "shapes"]
    with pytest.raises(data.DataError, match="validation"):
        data.load("shapes", "test")


def test_preparing_a_configs_data_builds_it_once(tmp_path):
    """What jaxrepro.analysis.variants does before starting processes side by side."""
    cfg = tiny_config("convnet", "data.num_train=8", "data.num_val=4", f"data.data_dir={tmp_path}")
    data.prepare_config_data(cfg.data)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    assert any(p.endswith("dataset_info.json") for p, _ in before)
    data.prepare_config_data(cfg.data)  # already there: nothing written
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    assert len(data.load_config_splits(cfg.data)["train"].labels) == 8
