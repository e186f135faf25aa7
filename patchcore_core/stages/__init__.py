"""PatchCore as restartable stages that exchange files, not tensors, one module each:

    fetch ─▶ extract(train) ─▶ coreset ──────────▶ index ─┐
      │             └────────▶ calibrate ─────────┘       │
      └────▶ extract(test) ───────────────────────────────┴─▶ score ─▶ metrics   (baseline: fit+score in one)

Each module has a typed, JSON-serialisable result (a pydantic model: the task contract the flows pass on) and
a `run(...)`. A stage writes atomically under a folder named by its fingerprint (its settings group from
`patchcore_core.config`, its inputs' fingerprints, the library version) and marks it complete last
(`patchcore_core.artifacts.StageDir`); calling it again with the same inputs returns the stored result.
Chained, the stages give exactly `PatchCore(**params).fit(train).predict(test)`.
"""

from patchcore_core.stages import baseline, calibrate, coreset, extract, fetch, index, metrics, score

__all__ = ["fetch", "extract", "coreset", "calibrate", "index", "score", "metrics", "baseline"]
