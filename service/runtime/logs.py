"""Logging set-up for the server commands: text (default) or one JSON object a line
(`SLUICE_LOG_FORMAT=json`), for log pipelines. A JSON line carries the current trace's `trace_id`
and `span_id` (hex, as trace back ends show them) when the line is logged inside a span, so a
log line and its trace find each other."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

from service.providers.registry import ConfigError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """`log_format`: `text` or `json` (anything else is a ConfigError)."""
    fmt = (log_format or "text").strip().lower()
    if fmt not in ("text", "json"):
        raise ConfigError(f"SLUICE_LOG_FORMAT must be text or json, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
