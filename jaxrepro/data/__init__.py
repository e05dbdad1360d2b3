"""jaxrepro's data pipeline: TFDS sources, a hash split, a pure epoch order, fingerprints.

Loading a split (what the trainer calls):

    split = jaxrepro.data.load(
        source="shapes",        # "shapes" | "cats_vs_dogs" | "folder"  (config data.source)
        split="train",          # "train" | "validation"
        image_size=180,         # side of the square images returned; None: the source's
        num_train=2000,         # size of the train split (even: balanced over 2 classes)
        num_val=1000,           # size of the validation split (even)
        data_dir=None,          # TFDS data_dir; None: $JAXREPRO_DATA_DIR or ./data/tfds
        folder=None,            # source "folder" only: the image folder
        builder_config=None,    # source "shapes" only: "default" | "tiny" | a ShapesConfig
    ) -> DataSplit              # .images uint8 [N,S,S,3], .labels int32 [N],
                                # .masks uint8 [N,S,S] or None, .ids list[str],
                                # .provenance (builder, config, path, skipped files)

Errors a user can fix (unknown source, data not prepared, too few examples, ...) raise
`DataError` with a message that says what to do.

Which examples: every source is a prepared TFDS builder with one split, `train`, read by
random access (array_record). Within each class, examples are ordered by SHA-256 of
their id; the first num_train/2 of each class form "train", the next num_val/2
"validation" (`split.partition`). Each split is in hash order too. Nothing depends on
storage order or on random state.

Sizes: the shapes set is drawn at the size asked. `builder_config=None` picks the named
config of that size ("default" 180 px x 3,000; "tiny" 32 px x 96) if it holds
num_train + num_val examples, else a custom config `s<size>_n<count>` whose count is
that of the smallest named config that suffices, so it holds the same scenes (same ids,
same split) as "tiny" or "default", drawn at that size. Other sources are resized to
`image_size` by one rule
(`images.decode_rgb`: Pillow, RGB, bilinear, whole image).

Order of training: `epoch_order(shuffle_key, epoch, n)` is a permutation of the
positions 0..n-1 of the train split, a pure function of (key, epoch);
`batch_at(key, epoch, batch, batch_size, n)` gives one full batch (the epoch's last
n % batch_size positions are dropped).

Fingerprints: `data_fingerprint(split)` (or arrays) and
`order_fingerprint(shuffle_key, num_epochs, n)`, hex SHA-256.

Adding a source: `@register_source("name")` on a function that returns an `Opened`
(a prepared TFDS builder and its feature names); see `sources.py`.

"""

from jaxrepro.data.errors import DataError
from jaxrepro.data.fingerprint import data_fingerprint, order_fingerprint
from jaxrepro.data.order import batch_at, batch_indices, epoch_order, num_batches
from jaxrepro.data.sources import (
    SOURCES,
    DataSplit,
    Opened,
    default_data_dir,
    load,
    load_config_splits,
    load_splits,
    prepare_config_data,
    register_source,
)
from jaxrepro.data.split import SPLITS, SplitError, partition, split_key

__all__ = [
    "DataError",
    "DataSplit",
    "Opened",
    "SOURCES",
    "SPLITS",
    "SplitError",
    "batch_at",
    "batch_indices",
    "data_fingerprint",
    "default_data_dir",
    "epoch_order",
    "load",
    "load_config_splits",
    "prepare_config_data",
    "load_splits",
    "num_batches",
    "order_fingerprint",
    "partition",
    "register_source",
    "split_key",
]
