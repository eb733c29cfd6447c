"""State dicts <-> safetensors shards with a Hugging Face index; nested-state flattening; checksums.

One module per job (import each name from the module that defines it):

- :mod:`~ray_ckpt.core.format.buffers`: tensors as raw bytes (:class:`TensorBuffer`, the dtype tables).
- :mod:`~ray_ckpt.core.format.tree`: nested state <-> flat tensors + a JSON structure.
- :mod:`~ray_ckpt.core.format.hf_index`: shard planning and the ``*.safetensors.index.json``.
- :mod:`~ray_ckpt.core.format.header`: the safetensors header, laid out and validated.
- :mod:`~ray_ckpt.core.format.digests`: the checksums and block digests writers record.
- :mod:`~ray_ckpt.core.format.checks`: bytes read, checked against those digests.
- :mod:`~ray_ckpt.core.format.safetensors_io`: safetensors files written and read.

This package knows bytes and tensors, not where the bytes go: every writer takes an open binary
file, every reader an open random-access file. Nothing here pickles.
"""
