"""The core: one run on one storage (format, commit protocol, index, retention, the store).

Never imports Ray, not even lazily: the Ray layer (``ray_ckpt.distributed``) hands observers in.
"""
