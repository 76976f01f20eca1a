"""The SCP's socket: what one peer can make us hold in memory is bounded, and reads are large.

pynetdicom reads a PDU by the length its 6-byte header claims and joins a message's P-DATA
fragments until the last one, with no limit of its own. A peer claiming a 4 GiB PDU, or
streaming a dataset that never ends in small PDUs, would grow the SCP's memory until the
kernel killed it, and every other association with it. :class:`BoundedAssociationSocket`
refuses both by failing the read: pynetdicom takes a failed read as "transport connection
closed" (its Evt17) and ends that association only; the SCP goes on serving.

The limits (checked while reading, before anything is kept):

- one PDU's claimed length: at most ``max_pdu_bytes`` (what we advertise as our maximum
  receive length, with room for a large A-ASSOCIATE-RQ; a peer must fragment P-DATA to it);
- one message's command or dataset: at most ``max_message_bytes`` of PDV data in a row
  before a fragment marked "last" (PS3.8 Annex E.2's message control header).

Hand-written, a few lines over pynetdicom's own ``AssociationSocket``, because pynetdicom has
no such limit to configure. It also reads straight into one preallocated buffer per PDU
(``recv_into``) instead of pynetdicom's 4 KiB ``recv`` calls joined one by one: with the
1 MiB PDUs the SCP advertises, a PDU is up to 256 of those calls.

A peer that stops sending in the middle of a PDU is bounded too. pynetdicom's acceptor
sockets have no timeout (its requestor sockets get the network timeout), and its DUL thread
only starts a read once the socket is readable, then reads the PDU whole: a peer that sends
a header and then nothing keeps that thread in ``recv`` forever. Its ACSE and network
timeouts cannot end such an association, because ending one waits for that thread; each
stalled peer holds one of the ``max_associations`` slots, and a few of them lock every
modality out. So a gap of more than the timeout inside a PDU (the ACSE timeout until the
first PDU is in, the network timeout after it) ends the read as if the peer had closed. A
peer that is idle *between* PDUs is never read from and is pynetdicom's to end (its
network timeout). A large C-STORE arriving slowly but steadily is not cut: the timeout is
for one gap, not for a whole PDU. The same timeout bounds our sends, so a peer that stops
reading our responses loses its connection the same way (pynetdicom's send closes on error).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger("cxr.dimse")

_P_DATA_TF = 0x04
_HEADER = 6  # PDU type, reserved, 4-byte length
_PDV_HEADER = 6  # 4-byte item length, context ID, message control header
_LAST_FRAGMENT = 0x02


class PeerLimitExceeded(ConnectionAbortedError):
    """A peer sent more than the SCP holds for one PDU or one message; its connection is closed."""


class BoundedAssociationSocket(AssociationSocket):
    """pynetdicom's socket with the limits above; one per accepted association."""

    max_pdu_bytes: int
    max_message_bytes: int
    _pdu_type: int
    _message_bytes: int
    _body_next: bool
    _first_pdu_in: bool

    @classmethod
    def adopt(cls, sock: AssociationSocket, max_pdu_bytes: int, max_message_bytes: int) -> None:
        """Give pynetdicom's socket of a new association these limits, in place.

        In place because pynetdicom's handler has already built the socket and queued the
        state machine's "connection open" event from its constructor; a second socket would
        queue it twice, and the association refuses a second one anyway.
        """
        sock.__class__ = cls
        assert isinstance(sock, cls)
        sock.max_pdu_bytes = max_pdu_bytes
        sock.max_message_bytes = max_message_bytes
        sock._pdu_type = 0
        sock._message_bytes = 0
        sock._body_next = False  # pynetdicom reads each PDU as its 6-byte header, then its body
        sock._first_pdu_in = False
        sock._set_stall_timeout()

    def _set_stall_timeout(self) -> None:
        """The longest gap a read waits for the peer's next bytes, from the association's timeouts.

        Until the first PDU (the A-ASSOCIATE-RQ) is in, the shorter of the ACSE and network
        timeouts: pynetdicom gives up waiting for the request after the ACSE timeout, so a
        longer wait would only hold the slot. After it, the network timeout, pynetdicom's own
        "no data for this long" (the ACSE timeout where that one is unset). ``None`` for both
        keeps the socket blocking, as pynetdicom leaves it.
        """
        assert self.socket is not None
        acse, network = self.assoc.acse_timeout, self.assoc.network_timeout
        if self._first_pdu_in:
            timeout = network if network is not None else acse
        else:
            timeout = min((t for t in (acse, network) if t is not None), default=None)
        self.socket.settimeout(timeout)

    def recv(self, nr_bytes: int) -> bytearray:
        """Exactly ``nr_bytes`` (fewer when the peer closed or stalled), or :class:`PeerLimitExceeded`."""
        if nr_bytes > self.max_pdu_bytes:
            log.warning(
                "dimse_peer_refused reason=pdu_too_large bytes=%d limit=%d", nr_bytes, self.max_pdu_bytes
            )
            raise PeerLimitExceeded(f"a PDU of {nr_bytes} bytes is over the SCP's {self.max_pdu_bytes}")
        data = self._read(nr_bytes)
        if not self._body_next:
            self._pdu_type = data[0] if data else 0
            self._body_next = True
        else:
            self._body_next = False
            if self._pdu_type == _P_DATA_TF:
                self._count_fragments(data)
            if not self._first_pdu_in and len(data) == nr_bytes:
                self._first_pdu_in = True
                self._set_stall_timeout()
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """Exactly ``nr_bytes``, or fewer when the peer closed or went silent mid-PDU.

        A silence longer than the socket's timeout (:meth:`_set_stall_timeout`) is answered as
        a close is: pynetdicom, given a short read, closes the connection (its Evt17) and ends
        the association cleanly. Raising instead would close it too, but with a traceback
        logged for what is only a stalled peer.
        """
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                log.warning(
                    "dimse_peer_refused reason=stalled_mid_pdu bytes=%d of=%d timeout_s=%s",
                    got,
                    nr_bytes,
                    sock.gettimeout(),
                )
                n = 0
            if n == 0:  # the peer closed (or stalled): what we have, as pynetdicom's own recv returns it
                del view
                return buf[:got]
            got += n
        return buf

    def _count_fragments(self, body: bytearray) -> None:
        """Add this P-DATA-TF's PDV data to the message being received; a last fragment ends it."""
        offset = 0
        while offset + _PDV_HEADER <= len(body):
            (item_length,) = struct.unpack_from(">L", body, offset)
            self._message_bytes += max(item_length - 2, 0)
            if self._message_bytes > self.max_message_bytes:
                log.warning("dimse_peer_refused reason=message_too_large limit=%d", self.max_message_bytes)
                raise PeerLimitExceeded(f"a DIMSE message over the SCP's {self.max_message_bytes} bytes")
            if body[offset + 5] & _LAST_FRAGMENT:
                self._message_bytes = 0
            offset += 4 + item_length


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server holding the limits its :class:`BoundedRequestHandler` applies.

    Set by :meth:`serving.dimse.scp.StorageScp.start` from its ``ScpConfig``, the one place they are chosen.
    """

    max_pdu_bytes: int
    max_message_bytes: int


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's handler, giving each association a :class:`BoundedAssociationSocket`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        assert isinstance(server, BoundedAssociationServer) and assoc.dul.socket is not None
        BoundedAssociationSocket.adopt(assoc.dul.socket, server.max_pdu_bytes, server.max_message_bytes)
        return assoc
