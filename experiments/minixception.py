"""The paper's mini Xception (Leventi-Peetz & Östreich, Listing 6) on the embedded
shapes data.

Run (this file is Python and is executed when loaded):

    python -m jaxrepro.train experiments/minixception.py

A tiny variant (32 px, 64 training images, 8 steps; what the tests run):

    python -m jaxrepro.train experiments/minixception.py:tiny

The paper's protocol in full (100 epochs, 2,000 train / 1,000 validation images at
180x180, Keras RMSprop defaults, flip/rotate 0.1/zoom 0.2, dropout 0.5):

    python -m jaxrepro.train experiments/minixception.py --config.num_epochs=100

Data sources and all other keys as in experiments/convnet.py; `--show-config` lists them.
"""

from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import ml_collections


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The ConvNet experiment's defaults with the mini Xception model; `variant="tiny"`
    the tests' small version (32 px, the smallest size this model's blocks take)."""
    spec = spec_from_file_location("convnet_config", Path(__file__).with_name("convnet.py"))
    base = module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.experiment = "minixception"
    c.model = "minixception"
    c.num_epochs = 1  # the paper: 100
    # The depthwise and 1x1 convolutions in the form XLA:CPU runs about 3x faster
    # (jaxrepro.models.ops.convolutions): as deterministic from run to run, jitted equal
    # to op by op, but other bits than XLA's own convolutions (False).
    c.fast_convs = True
    return base.apply_variant(c, variant, {**base.TINY, "image_size": 32})
