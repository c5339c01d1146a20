"""Log output of both services: plain text or JSON lines (`--log-format`), and the per-request line.

A record may carry `fields` (a dict, passed as `extra={"fields": {...}}`). JSON output puts them at the top
level of the line's object; text output appends them as `key=value` pairs. docs/OBSERVABILITY.md lists them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

REQUEST_LOGGER = "llmserve.request"  # one INFO line per finished request
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # --log-level takes any case


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
                                  "msg": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The usual `time level logger: message`, then the record's fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """`time level logger: message` and the record's fields as key=value, on one line: a message's characters
        that are not printable are escaped (`\\n`, `\\x1b`), since its arguments can be a client's (a request id
        with a newline wrote a forged line), and a field's value is JSON-quoted where it would break the line
        (_text_value). A traceback, appended after this by format(), keeps its lines, after the fields (appended
        after the traceback, they ended its last line: `ValueError: bad request_id=a`)."""
        line = super().formatMessage(record)
        if not line.isprintable():
            line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return line


def _text_value(value: object) -> str:
    """A field's value for a key=value line: bare, or JSON-quoted when it would break the line apart or write
    something else than itself to a terminal (spaces, '=', quotes, any character that is not printable: a
    newline, an ANSI escape, U+2028, as an error message or a client's request id may hold)."""
    text = str(value)
    # str methods in C, not a generator over the characters: every request's log line comes through here.
    quote = not text or not text.isprintable() or " " in text or "=" in text or '"' in text
    return json.dumps(text) if quote else text


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Importing transformers where torch is absent (the tokenizer image) prints an advisory ("PyTorch was not
    # found") through its own handler, before that handler can be disabled below.
    quiet = "TRANSFORMERS_NO_ADVISORY_WARNINGS" not in os.environ  # set only for the import, not for good
    if quiet:
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:  # transformers writes through a stderr handler of its own: its lines would be plain text among JSON
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    finally:
        if quiet:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
