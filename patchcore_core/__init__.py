"""PatchCore industrial anomaly detection: the algorithm library (no orchestration inside)."""

__version__ = "0.1.0"

__all__ = ["__version__", "PatchCore"]


def __getattr__(name: str):
    # Lazy import keeps `import patchcore_core` cheap for tools that only need the version.
    if name == "PatchCore":
        from patchcore_core.model import PatchCore

        return PatchCore
    raise AttributeError(name)
