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
    a good value for the message. Raises :class:`AddressError` otherwise, naming the value without
    its credentials: the message reaches the console and the component's log.
    """
    problem = None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number or above 65535
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        # the reason may quote a piece of the value (a "port" cut from a password with a "/" in it)
        problem = str(exc) if _masked(value) == value else "it is no valid URL"
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it names no host"
    if problem is not None:
        raise AddressError(f"{setting} {_masked(value)!r} is not a server address like {example} ({problem})")
    return value


def _masked(value: str) -> str:
    """``value`` with everything up to its last ``@`` after the scheme shown as ``***@``.

    For a value that is no valid URL, which has no reliable ``user:password@`` part to cut: a
    password with a ``/`` or ``#`` in it, or a ``user:password@host`` with no scheme. Where the
    host part cannot be told from the password, hiding too much is the safe side.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    if "@" not in rest:
        return value
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


def redacted(url: str) -> str:
    """``url`` without its ``user:password@``: a message naming a server reaches the caller and the log.

    Never raises: a value that is no valid URL (``urlsplit`` refuses it) is shown by :func:`_masked`, and
    so is one with an ``@`` after what urllib took for its host: ``user:password@host`` (urllib reads
    "user" as a scheme), or a password with a ``/``, ``?`` or ``#`` in it, at which urllib ends the host
    part (``http://user:pa/ss@host``: host "user", the password in the path).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _masked(url)
    if "@" in url and "@" not in parts.netloc:
        return _masked(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
