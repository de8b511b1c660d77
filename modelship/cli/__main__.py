"""`python -m modelship.cli ...`, the same as the `modelship` console command (torchrun uses this form)."""

import sys

from modelship.cli import console

sys.exit(console())
