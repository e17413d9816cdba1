"""`python -m mmfm`: the same entry point as the `mmfm` script."""

import sys

from mmfm.cli import main

sys.exit(main())
