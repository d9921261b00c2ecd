"""structlog set-up: JSON lines by default when not on a terminal.

Every log line is an event with a stable name (``call.routed``, ``call.ended``,
``router.started``) and key/value fields; caller numbers are masked by the
callers of the logger (``domain.numbers.mask``). Engine (pjsip) log lines come in
through the SIP adapter's log writer at debug level.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def configure(fmt: str, level: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    # uvicorn and other libraries log through the stdlib: keep their warnings.
    logging.basicConfig(level=max(LEVELS[level], logging.WARNING), stream=out,
                        format="%(levelname)s %(name)s %(message)s")
