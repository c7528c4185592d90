"""Where metrics go: a two-method interface (`log`, `close`) and the built-in backends.

Built-in names for `monitor(loggers=...)`: "stdout", "jsonl", "wandb", "tensorboard". A
`Logger` instance may be passed instead of a name. Backends with heavy dependencies are
imported only when their name is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mfumon.errors import ConfigError, ConfigTypeError, MissingDependencyError, log
from mfumon.loggers.base import Logger
from mfumon.loggers.jsonl import JsonlLogger
from mfumon.loggers.stdout import StdoutLogger

__all__ = ["LOGGER_NAMES", "Logger", "LoggerSet", "make_loggers"]


def _stdout(**kw: Any) -> Logger:
    return StdoutLogger()


def _jsonl(*, run_name: str, log_dir: Path, **kw: Any) -> Logger:
    return JsonlLogger(log_dir / f"{run_name}.jsonl")


def _wandb(*, run_name: str, log_dir: Path, **kw: Any) -> Logger:
    module = importlib.import_module("mfumon.loggers.wandb_logger")
    return module.WandbLogger(run_name=run_name, log_dir=log_dir)


def _tensorboard(*, run_name: str, log_dir: Path, **kw: Any) -> Logger:
    module = importlib.import_module("mfumon.loggers.tensorboard_logger")
    return module.TensorBoardLogger(log_dir / run_name)


_FACTORIES = {"stdout": _stdout, "jsonl": _jsonl, "wandb": _wandb, "tensorboard": _tensorboard}
LOGGER_NAMES: tuple[str, ...] = tuple(_FACTORIES)
# logger name -> (module it imports, pip extra that provides it)
_EXTRAS = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def _check_extra(name: str) -> None:
    """Raise MissingDependencyError at setup when a named logger's package is not installed."""
    if name not in _EXTRAS:
        return
    module, extra = _EXTRAS[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"the {name!r} logger needs the {extra} package: pip install 'mfumon[{extra}]'"
        ) from None


def validate_logger_spec(spec: Iterable[str | Logger] | str | Logger | None) -> list[str | Logger]:
    """The logger spec as a list, or ConfigError/ConfigTypeError naming what to pass."""
    if spec is None:
        return []
    if isinstance(spec, (str, Logger)):
        spec = [spec]
    items = list(spec)
    for item in items:
        if isinstance(item, str):
            if item in _FACTORIES:
                _check_extra(item)
            else:
                raise ConfigError(
                    f"loggers: unknown logger {item!r}; pass any of {list(LOGGER_NAMES)} "
                    "or a mfumon.Logger instance"
                )
        elif not isinstance(item, Logger):
            raise ConfigTypeError(
                f"loggers: expected names from {list(LOGGER_NAMES)} or mfumon.Logger instances, "
                f"got {type(item).__name__}"
            )
    return items


def make_loggers(
    spec: Iterable[str | Logger] | str | Logger | None, *, run_name: str, log_dir: Path
) -> list[Logger]:
    """Build the loggers named in `spec` (names or `Logger` instances); setup errors raise here.

    A `log_dir` a file logger cannot write in raises ConfigError naming `log_dir`.
    """
    built: list[Logger] = []
    opened: list[Logger] = []  # built here from names: closed again if a later one fails
    for item in validate_logger_spec(spec):
        if not isinstance(item, str):
            built.append(item)  # the caller's own instance: the caller closes it
            continue
        try:
            opened.append(_FACTORIES[item](run_name=run_name, log_dir=log_dir))
            built.append(opened[-1])
        except OSError as exc:
            for logger in opened:
                logger.close()
            raise ConfigError(
                f"the {item!r} logger cannot write in log_dir={str(log_dir)!r} ({exc}); "
                "pass log_dir=<a directory this process can create and write>"
            ) from exc
    return built


class LoggerSet:
    """Fans out to several loggers; a logger that raises is reported once and switched off."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)

    def __len__(self) -> int:
        return len(self.loggers)

    def call(self, method: str, *args: Any) -> None:
        """Call `method` on every live logger, dropping any that raises."""
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # a logger must never stop a training run
                self.loggers.remove(logger)
                log.warning(
                    "mfumon: logger %s raised in %s (%s: %s); it is switched off, training goes on",
                    type(logger).__name__,
                    method,
                    type(exc).__name__,
                    exc,
                )
                if method != "close":
                    try:
                        logger.close()
                    except Exception:
                        pass
