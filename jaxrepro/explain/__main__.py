"""`python -m jaxrepro.explain`: see `jaxrepro.explain.cli`."""

import sys

from jaxrepro.explain.cli import main

sys.exit(main())
