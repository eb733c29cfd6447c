"""The ``ray-ckpt`` command line (kept empty so that ``--help`` imports as little as possible)."""
