"""``python -m ray_ckpt.demo``: see :mod:`ray_ckpt.demo`."""

from ray_ckpt.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
