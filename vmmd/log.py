"""Logging: the one structlog configuration of the package.

`configure()` is called once by an entry point (CLI, daemon); every module
gets its logger with `get_logger(__name__)` and binds context (vm_id) with
`.bind()`.  Logs go to stderr, so a guest console on stdout stays clean.
"""

from __future__ import annotations

import sys
from typing import Any

_DEFAULTS = ("console", "warning")  # (fmt, level) before configure()
_settings: tuple[str, str] | None = None  # (fmt, level) as configure() was given them
_applied = False  # structlog loaded and configured with them


class _StderrLogger:
    """Writes each rendered line to the *current* sys.stderr.  structlog's
    PrintLogger keeps the stream it was given; when that stream is replaced
    and closed (test capture, a daemon's redirection) every later log call
    would raise - in whichever thread logged, e.g. a VM's watcher."""

    def msg(self, message: str) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # a log line is never worth a thread

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure(fmt: str = "console", level: str = "info") -> None:
    """Set up structlog for JSON (daemons) or human console output.  structlog
    itself loads with the first line that passes the level (_LazyLogger)."""
    global _settings, _applied
    _settings, _applied = (fmt, level), False
    if "structlog" in sys.modules:
        _structlog()


def _structlog() -> Any:
    """structlog, configured as configure() was told."""
    global _applied
    import logging

    import structlog

    if _applied:
        return structlog
    fmt, level = _settings or _DEFAULTS
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    _applied = True
    return structlog


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40,
           "critical": 50, "fatal": 50}


def _drop(*args: Any, **kw: Any) -> None:
    pass


class _LazyLogger:
    """A bound logger that loads structlog with its first line at or above the
    configured level.  structlog (and the rich it pulls in where installed)
    costs ~100 ms of import: `vmmd run` logs nothing at its default level
    (warning) and must not pay that before its guest starts."""

    __slots__ = ("_name", "_context", "_real")

    def __init__(self, name: str, context: dict[str, Any]) -> None:
        self._name, self._context, self._real = name, context, None

    def bind(self, **context: Any) -> Any:
        if self._real is not None:
            return self._real.bind(**context)
        return _LazyLogger(self._name, {**self._context, **context})

    def __getattr__(self, attr: str) -> Any:
        if self._real is None:
            level = _LEVELS.get(attr)
            if level is not None and level < _LEVELS.get((_settings or _DEFAULTS)[1], 0):
                return _drop  # below the level: structlog would drop it too
            self._real = _structlog().get_logger(self._name).bind(**self._context)
        return getattr(self._real, attr)


def get_logger(name: str, **context: Any) -> Any:
    return _LazyLogger(name, context)
