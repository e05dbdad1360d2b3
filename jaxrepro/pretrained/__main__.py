"""`python -m jaxrepro.pretrained`: see `jaxrepro.pretrained.cli`."""

import sys

from jaxrepro.pretrained.cli import main

sys.exit(main())
