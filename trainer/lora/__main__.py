"""`python -m trainer.lora ...`: the same options as `trainer lora`."""

import sys

from trainer.lora.cli import lora_main

sys.exit(lora_main())
