"""The DIMSE component of the stack: SCP + forwarder from the serving settings, until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from core.credentials import read_credentials
from core.errors import CredentialsError
from serving.config import ServingSettings
from serving.dimse.forwarder import Forwarder, largest_instance
from serving.dimse.scp import ScpConfig, StorageScp
from serving.dimse.spool import InstanceSpool
from serving.logsafe import OneLine

log = logging.getLogger("cxr.dimse")

#: how long a stopping SCP gives the associations and gateway requests in progress to finish: within
#: the 10 s ``cxr stack down`` waits (supervisord's stopwaitsecs is 20 s, a pod's grace 30 s) before
#: they kill it. Associations get the first half.
STOP_GRACE_S = 8.0


def gateway_key(settings: ServingSettings) -> str:
    """The SCP's key for the gateway: CXR_DIMSE_API_KEY, else the stack's pacs key."""
    if settings.dimse_api_key:
        return settings.dimse_api_key
    creds = read_credentials(settings.stack_dir)
    key = creds.api_keys.get("pacs", "") if creds else ""
    if not key:
        raise CredentialsError(
            "the DIMSE SCP needs a pacs API key for the gateway: set CXR_DIMSE_API_KEY "
            f"or start it from a stack whose credentials.json (in {settings.stack_dir}) has one"
        )
    return key


def build(settings: ServingSettings) -> tuple[StorageScp, Forwarder]:
    spool = InstanceSpool(
        settings.resolved_dimse_spool_dir,
        max_study_instances=settings.dimse_max_study_instances,
        max_instances=settings.dimse_max_spool_instances,
        max_studies=settings.dimse_max_spool_studies,
        min_free_inodes=settings.dimse_min_free_inodes,
    )
    scp = StorageScp(
        ScpConfig(
            ae_title=settings.dimse_ae_title,
            host=settings.dimse_host,
            port=settings.dimse_port,
            allowed_aes=tuple(settings.dimse_allowed_aes),
            max_associations=settings.dimse_max_associations,
            # what the forwarder can post in one body: an instance the gateway refuses (413) every
            # time must never be acknowledged
            max_instance_bytes=largest_instance(settings.max_body_bytes),
        ),
        spool,
    )
    forwarder = Forwarder(
        spool,
        gateway_url=settings.dimse_gateway_url,
        api_key=gateway_key(settings),
        settle_s=settings.study_settle_seconds,
        max_wait_s=settings.study_max_wait_seconds,
        max_body_bytes=settings.max_body_bytes,
        concurrency=settings.dimse_forward_concurrency,
    )
    return scp, forwarder


def configure_logging() -> None:
    """The SCP process's logging: ours at INFO, the libraries' per-request lines off, UIDs kept out,
    a record one line however it was made (:class:`OneLine`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for handler in logging.getLogger().handlers:  # every record, whichever library's logger made it
        if not any(isinstance(f, OneLine) for f in handler.filters):
            handler.addFilter(OneLine())
    # their INFO lines quote UIDs (pynetdicom's requests, httpx's URLs with the study): not in our logs
    for noisy in ("pynetdicom", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from serving import logsafe

    logsafe.install()


def main() -> None:
    configure_logging()
    settings = ServingSettings()
    scp, forwarder = build(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    studies, instances = scp.spool.depth()
    log.info("dimse_spool_recovered studies=%d instances=%d", studies, instances)
    forwarder.start()
    scp.start()
    stop.wait()
    deadline = time.monotonic() + STOP_GRACE_S
    scp.stop()
    aborted = scp.end_associations(STOP_GRACE_S / 2)
    cut = forwarder.stop(timeout_s=deadline - time.monotonic())
    log.info("dimse_scp_stopped associations_aborted=%d forwards_cut=%d", aborted, cut)
    if cut:
        # a request to the gateway still waiting for its answer: its pool thread would hold the
        # interpreter's exit until the answer or the client's timeout (120 s), past any stop timeout.
        # What it was doing is in the spool, durably (Forwarder.stop)
        logging.shutdown()
        os._exit(0)
