"""`python -m jaxrepro.train`: see `jaxrepro.train.cli`."""

import sys

from jaxrepro.train.cli import main

sys.exit(main())
