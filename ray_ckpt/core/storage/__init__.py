"""Bytes and paths on a local disk or an object store, behind one :class:`Storage`.

Import each name from the module that defines it:

- :mod:`~ray_ckpt.core.storage.storage`: :class:`Storage` (what callers use: every operation,
  the one retry helper) and :func:`backend_for`, the one place that picks a backend.
- :mod:`~ray_ckpt.core.storage.base`: the :class:`Backend` protocol and what backends share
  (temporary names, retry settings, failure classification, the bound on whole-file reads).
- :mod:`~ray_ckpt.core.storage.local`: a local directory (O_DIRECT writer, fsync, rename, swaps).
- :mod:`~ray_ckpt.core.storage.objectstore`: s3:// through s3fs, memory:// and other fsspec
  filesystems (multipart uploads, retried reads).
"""
