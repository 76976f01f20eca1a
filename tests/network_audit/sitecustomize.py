"""Network audit for the closed-network test (imported at start-up by every Python child).

Put this folder first on ``PYTHONPATH`` and set ``CXR_NET_AUDIT_LOG``: every
``socket.connect`` / ``socket.getaddrinfo`` / ``socket.sendto`` whose destination is
not loopback is appended to that file as one JSON line (pid, argv, event, target).
It records rather than blocks, so the run behaves as it would in production and
the test sees every attempt, not only the first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys

_LOG = os.environ.get("CXR_NET_AUDIT_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", socket.gethostname()}


def _is_local(host: object) -> bool:
    if host is None or host in ("", b""):
        return True  # passive lookups for bind()
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return True
    host = host.strip("[]").split("%")[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name other than our own: that lookup is already traffic
    return addr.is_loopback or addr.is_unspecified


def _record(event: str, target: object) -> None:
    assert _LOG is not None
    line = json.dumps({"pid": os.getpid(), "argv": sys.argv[:4], "event": event, "target": repr(target)})
    with open(_LOG, "a") as handle:
        handle.write(line + "\n")


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event == "socket.getaddrinfo":
        if not _is_local(args[0]):
            _record(event, args[0:2])
    elif event in ("socket.connect", "socket.sendto"):
        address = args[1]
        if isinstance(address, tuple) and address and not _is_local(address[0]):
            _record(event, address)


if _LOG:
    sys.addaudithook(_hook)
