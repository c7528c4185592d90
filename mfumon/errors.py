"""Exceptions and warnings raised by mfumon.

    MfumonError
     ├── ConfigError (also ValueError)          a value you passed is out of range or unknown
     ├── ConfigTypeError (also TypeError)       an object you passed is of the wrong kind
     └── MissingDependencyError (also ImportError)  an optional extra is not installed

    MfumonWarning (UserWarning)                 setup-time advice, e.g. an unknown device

Setup mistakes raise at once. After setup nothing raises into the training loop: runtime
faults go, once each, to the ``mfumon`` logger of the standard ``logging`` module.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ConfigTypeError", "MfumonError", "MfumonWarning", "MissingDependencyError"]


class MfumonError(Exception):
    """Base class of every exception mfumon raises."""


class ConfigError(MfumonError, ValueError):
    """A value passed to mfumon is out of range, unknown or inconsistent."""


class ConfigTypeError(MfumonError, TypeError):
    """An object passed to mfumon is not of a kind it can use."""


class MissingDependencyError(MfumonError, ImportError):
    """An optional dependency is missing; the message gives the pip command to install it."""


class MfumonWarning(UserWarning):
    """Setup-time advice, such as a device with no known peak."""
