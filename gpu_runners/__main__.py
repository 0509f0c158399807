"""`python3 -m gpu_runners ...`: see `gpu_runners.cli`."""

from gpu_runners.cli import main

raise SystemExit(main())
