"""Server addresses a person typed (an option, a ``CXR_*_URL``): checked once, shown without credentials.

httpx raises ``InvalidURL`` for ``http://[::1`` or a port above 65535, and that is no
``httpx.HTTPError``: the commands that catch only the latter ended in a traceback. A wrong
scheme (``ftp://``, a bare ``host:port``) reached the network and came back as "unreachable,
is the stack up?", which sends the person to the wrong fix. Checked before any request,
each is one line naming the value and the setting to change.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from core.errors import CxrError


class AddressError(CxrError):
    """A server address that is not an http(s) URL with a host."""


def http_url(value: str, setting: str, example: str) -> str:
    """``value`` when it is an ``http://`` or ``https://`` URL with a host and a valid port.

    ``setting`` names where it came from (e.g. ``--gateway / CXR_GATEWAY_URL``); ``example`` is
    a good value for the message. Raises :class:`AddressError` otherwise.
    """
    problem = None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number or above 65535
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it names no host"
    if problem is not None:
        raise AddressError(f"{setting} {value!r} is not a server address like {example} ({problem})")
    return value


def redacted(url: str) -> str:
    """``url`` without its ``user:password@``: a message naming a server reaches the caller and the log."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
