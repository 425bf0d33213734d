"""`python -m llmq ...` (and `torchrun --nproc-per-node N -m llmq quantize ...`): the command line."""

import sys

from llmq.cli import main

sys.exit(main())
