"""Entry point of `python -m gpu_runners.doctor`."""

import sys

from gpu_runners.doctor.cli import main

sys.exit(main())
