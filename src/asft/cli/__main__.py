"""`python -m asft.cli ...` (what `accelerate launch ... -m asft.cli` runs)."""

import sys

from . import main

sys.exit(main())
