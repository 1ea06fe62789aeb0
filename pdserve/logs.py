"""Logging for the command line: one line per record on stderr, written by a background thread.

The request path logs a line per request in each process it crosses (a client's request id
greps through every log). Formatting that line (its timestamp above all) and writing it to stderr
cost the gateway about a tenth of its event loop's time per request (`pdserve bench gateway`,
py-spy). A `QueueHandler` hands the record to a listener thread instead, which formats and writes
it while the loop waits for I/O; the listener is flushed at exit, so no line is lost on a clean
shutdown."""
from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(verbose: bool = False) -> None:
    """Like logging.basicConfig: does nothing when the root logger already has handlers (a host
    application's, or pytest's)."""
    root = logging.getLogger()
    if root.handlers:
        return
    records: queue.SimpleQueue = queue.SimpleQueue()
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(logging.Formatter(FORMAT))
    listener = logging.handlers.QueueListener(records, out, respect_handler_level=True)
    listener.start()
    atexit.register(listener.stop)
    root.addHandler(_Handoff(records))
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class _Handoff(logging.handlers.QueueHandler):
    """Hands the record over as it is: the stdlib's `prepare` formats the message here, on the
    caller's thread, which is the cost this moves away. The message and any exception text are
    fixed now (arguments may change after the call), the rest is formatted by the listener."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record
