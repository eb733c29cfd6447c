"""Tiers: stores composed from plain core stores (a local store plus a remote one, uploaded in the background)."""
