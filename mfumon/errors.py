"""Exceptions and warnings raised by mfumon, the one int check, and how runtime faults are reported.

    MfumonError
     ├── ConfigError (also ValueError)          a value you passed is out of range or unknown
     ├── ConfigTypeError (also TypeError)       an object you passed is of the wrong kind
     └── MissingDependencyError (also ImportError)  an optional extra is not installed

    MfumonWarning (UserWarning)                 setup-time advice, e.g. an unknown device

Setup mistakes raise at once. After setup nothing raises into the training loop: runtime
faults go, once each, to the ``mfumon`` logger of the standard ``logging`` module (`FaultLog`).
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "FaultLog",
    "MfumonError",
    "MfumonWarning",
    "MissingDependencyError",
    "check_int",
]

log = logging.getLogger("mfumon")


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


def check_int(name: str, value: Any, what: str, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`; ConfigTypeError for a non-integer, ConfigError below `minimum`.

    The message names the argument `name` and what it counts (`what`), so it says what to pass.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigTypeError(f"{name} must be an int >= {minimum} ({what}), got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum} ({what}), got {value!r}")
    return int(value)


class FaultLog:
    """Logs each kind of runtime fault once to the ``mfumon`` logger; never raises.

    A monitor holds one per run; module-level ones (device naming) are per process.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def report(self, kind: str, message: str, *args: object) -> bool:
        """Log `message % args` at WARNING unless `kind` was reported before; True when it was logged.

        Formatting is left to `logging`, lazily; an exception whose `str()` fails, or a handler
        that raises on it, never escapes into the training loop from here.
        """
        if kind in self._seen:
            return False
        self._seen.add(kind)
        try:
            log.warning(message, *args)
        except Exception:  # a handler that re-raises formatting errors (pytest's capture does)
            pass
        return True

    def fault(
        self, kind: str, exc: BaseException, consequence: str = "this part is skipped, training goes on"
    ) -> bool:
        """Report an exception of `kind` once, with what happens next (`consequence`)."""
        return self.report(kind, "mfumon: %s fault (%s: %s); %s", kind, type(exc).__name__, exc, consequence)

    def seen(self, kind: str) -> bool:
        """True once `kind` has been reported."""
        return kind in self._seen

    def clear(self) -> None:
        """Forget what was reported (a new run, or a test starting fresh)."""
        self._seen.clear()
