"""`python -m vtp_fast.cli`: the vtp-fast command (torchrun launches it this way)."""

import sys

from vtp_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
