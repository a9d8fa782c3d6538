"""`python -m finetune ...` and `accelerate launch -m finetune ...` / `torchrun -m finetune ...`."""

import sys

from finetune.cli import main

sys.exit(main())
