"""`python -m trainer ...` (what `accelerate launch -m trainer` runs)."""

import sys

from trainer.cli import main

sys.exit(main())
