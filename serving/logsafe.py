"""No patient data in the gateway's log: pydicom's warnings and log lines lose their text.

pydicom validates element values as it reads them and says what it found
("Invalid value for VR DA: '20231399'", a UID, a name), both through
:mod:`warnings` and its ``pydicom`` logger. :func:`install` routes warnings
through logging (``py.warnings``) and puts :class:`WithholdValues` on those
loggers, so such a record keeps its origin, level and category but none of
its text, and no traceback (exception messages quote values too).
"""

from __future__ import annotations

import logging
import re
import traceback

from core.progress import CONTROL_CHARS

# warnings.formatwarning: "<file>:<line>: <Category>: <message>\n  <source line>\n"
_WARNING = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>[A-Za-z_][\w.]*): ")
PYDICOM_LOGGERS = (
    "pydicom",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.encoders.base",
    "pydicom.pixels.utils",
)


def _where(path: str, line: str) -> str:
    return f"{'/'.join(path.replace(chr(92), '/').split('/')[-2:])}:{line}"


class WithholdValues(logging.Filter):
    """Rewrites a record in place to its origin and category; never drops it (the event stays visible)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "cxr_withheld", False):
            return True
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        if record.name == "py.warnings":
            text = str(record.args[0]) if isinstance(record.args, tuple) and record.args else str(record.msg)
            found = _WARNING.match(text)
            if found:
                origin = "pydicom" if "pydicom" in found["file"] else "python"
                record.msg = "%s warning suppressed (%s at %s; its text may hold element values)"
                record.args = (origin, found["category"], _where(found["file"], found["line"]))
            else:
                record.msg, record.args = "python warning suppressed (its text may hold element values)", ()
        else:
            record.msg = "%s %s suppressed (%s; its text may hold element values)"
            record.args = (record.name, record.levelname.lower(), exc_type or "message")
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        setattr(record, "cxr_withheld", True)  # noqa: B010  (LogRecord declares no such field)
        return True


def _escaped(text: str) -> str:
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class OneLine(logging.Filter):
    """Escapes control characters in a record's message and in its exception's, in place.

    A peer's bytes reach the log before any check of ours: pynetdicom refuses a calling AE title with
    control characters while decoding the A-ASSOCIATE-RQ and logs it raw at ERROR, in its message and
    its traceback, from any peer that can connect. A newline there forged log lines, an escape sequence
    reached the operator's terminal. The traceback keeps its own lines; its exception's text is escaped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: the handler reports it at emit, not in the logging call
            return True
        if CONTROL_CHARS.search(message):
            record.msg, record.args = _escaped(message), ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            exc = record.exc_info[1]
            if CONTROL_CHARS.search(str(exc)):
                trace = "".join(traceback.format_tb(exc.__traceback__))
                record.exc_text = (
                    f"Traceback (most recent call last):\n{trace}{type(exc).__name__}: {_escaped(str(exc))}"
                )
        return True


_FILTER = WithholdValues()


def install() -> None:
    """Idempotent: capture warnings, filter ``py.warnings`` and every ``pydicom*`` logger known now."""
    import pydicom.pixels  # noqa: F401  (creates pydicom's per-module loggers, so they exist to filter)

    logging.captureWarnings(True)
    names = {"py.warnings", *PYDICOM_LOGGERS}
    names.update(n for n in logging.Logger.manager.loggerDict if n == "pydicom" or n.startswith("pydicom."))
    for name in sorted(names):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
