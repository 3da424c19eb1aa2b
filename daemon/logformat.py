"""Daemon log output: human text lines, or one JSON object per line (``log_format = "json"``)
that log shippers (Fluent Bit, Vector, Loki's promtail) parse without a custom pattern."""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts": RFC 3339 UTC, "level", "logger", "msg", "pid", "thread"[, "exc"]}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage(), "pid": record.process,
               "thread": record.threadName}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level_name: str, log_format: str) -> None:
    level = getattr(logging, level_name.upper(), logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])


class Throttle:
    """Warnings that a flood repeats: at most one line per key and ``every`` seconds, the
    lines held back counted into the next one.  Thread-safe enough for its use: a lost count
    under a race only shortens the "(N more)" figure."""

    def __init__(self, log: logging.Logger, every: float = 1.0):
        self.log = log
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it since the last such line)"
            args = (*args, held)
        self.log.warning(msg, *args)
