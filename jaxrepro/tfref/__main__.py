"""`python -m jaxrepro.tfref`: see `jaxrepro.tfref.cli`."""

import sys

from jaxrepro.tfref.cli import main

sys.exit(main())
