"""`python -m slurm ...` is `python -m slurm.submit ...`."""
import sys

from slurm.submit import main

sys.exit(main())
