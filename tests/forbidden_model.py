"""A module that must never be imported: allowed_architecture_prefixes must refuse it first."""

raise RuntimeError("tests.forbidden_model was imported although it is outside allowed_architecture_prefixes")
