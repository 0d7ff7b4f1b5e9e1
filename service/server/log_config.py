"""structlog set-up: JSON lines for machines (the default) or a console format for people.

The gateway's own events are rendered by structlog alone and written straight to stderr:
every request logs, and a trip through the standard library's `logging` (record, handler,
formatter) costs several times the rendering itself on the request path. Standard-library
loggers (uvicorn, asyncio) go through a formatter with the same processors, so one process
writes one log format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from service.json_codec import dumps_str


class NamedWriteLogger(structlog.WriteLogger):
    """structlog's plain file logger plus the name it was asked for, so that
    `add_logger_name` can fill `logger` as it does for standard-library loggers."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> NamedWriteLogger:
        name = args[0] if args and isinstance(args[0], str) else "service"
        return NamedWriteLogger(self._file, name)


def configure_logging(
    level: str = "info", json_logs: bool = True, stream: TextIO | None = None
) -> None:
    stream = stream or sys.stderr
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=dumps_str)
        if json_logs
        else structlog.dev.ConsoleRenderer()
    )
    # The console renderer formats exceptions itself.
    exc_info: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if json_logs else []
    )
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *exc_info, renderer],
        logger_factory=NamedWriteLoggerFactory(stream),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
