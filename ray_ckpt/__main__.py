"""``python -m ray_ckpt``: the ``ray-ckpt`` command line."""

from __future__ import annotations

import sys

from ray_ckpt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
