"""Exceptions with messages that name the file or setting at fault."""


class PatchCoreError(Exception):
    """Base class of every error this library raises on purpose."""


class DataError(PatchCoreError, ValueError):
    """Bad input data: a corrupt image, a missing mask, an invalid dataset layout, an unreachable URL."""


class WeightsUnavailableError(PatchCoreError, RuntimeError):
    """Pretrained backbone weights could not be found or downloaded; the message says how to provide them."""


class IncompatibleModelError(PatchCoreError, ValueError):
    """A saved model was written by an incompatible library version or is incomplete."""


class ConfigError(PatchCoreError, ValueError):
    """A setting outside its allowed range; the message names the setting, the range and the value given."""
