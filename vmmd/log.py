"""Logging: the one structlog configuration of the package.

`configure()` is called once by an entry point (CLI, daemon); every module
gets its logger with `get_logger(__name__)` and binds context (vm_id) with
`.bind()`.  Logs go to stderr, so a guest console on stdout stays clean.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


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
    """Set up structlog for JSON (daemons) or human console output."""
    global _configured
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
    _configured = True


def get_logger(name: str, **context: Any) -> Any:
    if not _configured:
        configure(level="warning")
    return structlog.get_logger(name).bind(**context)
