"""``python -m ursa_engine ...`` (and ``torchrun --nproc-per-node N -m ursa_engine generate ... --parallel``):
the ``ursa-engine`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
