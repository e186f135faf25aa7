"""Applications built on `patchcore_core`: experiment runners and reports, not part of the algorithm library."""
