"""Side-by-side checkpoint benchmarks: ray-ckpt against the raw disk, torch.save, safetensors and DCP.

Run ``python -m benchmarks.run --size 1GiB --tensors 16`` (see benchmarks/README.md).
"""
