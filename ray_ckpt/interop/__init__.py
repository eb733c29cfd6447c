"""Other formats and places: legacy files, migration, checkpoint artifacts by URI, ``mock://`` models."""
