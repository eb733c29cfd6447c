"""Tiers: stores composed from plain core stores (a local and a remote store joined by an uploader;
:func:`~ray_ckpt.tiers.tiered.open_store` opens a run plain or tiered from its config)."""
