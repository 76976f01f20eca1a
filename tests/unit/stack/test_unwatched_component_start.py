"""A component without a health endpoint that dies after its start-up: a real supervisord.

supervisord restarts a process that lived ``startsecs`` for ever. With 1 s, one that failed 1.2 s in
(the scheduler on a bad CXR_SCHEDULER_CRON exits after 1.7 s) looped RUNNING-BACKOFF-RUNNING for
ever, ``make up`` said "started" and ``make status`` "healthy" whenever it looked while it ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.components import UNWATCHED_STARTSECS, Component, ComponentFailed, reconcile_component
from stack.manager import _wait_running
from stack.supervisor import Supervisor

pytestmark = pytest.mark.unit


def test_a_component_without_health_endpoint_dying_after_a_second_ends_fatal_and_up_says_so(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    supervisor = Supervisor(state)
    dies = Component(
        "dies", ["/bin/sh", "-c", "echo bad schedule; sleep 1.2; exit 1"], None, startsecs=UNWATCHED_STARTSECS
    )
    try:
        supervisor.write_config([dies])
        supervisor.start()
        with pytest.raises(ComponentFailed, match=r"dies did not keep running \(FATAL\)") as failed:
            _wait_running(supervisor, dies, timeout=60, log_file=state / "logs" / "dies.log")
        assert "bad schedule" in str(failed.value), "the log tail says why"
        proc = supervisor.process_state("dies")
        assert proc is not None and proc.state == "FATAL"
    finally:
        supervisor.shutdown(timeout=10)


def test_the_stacks_components_without_health_endpoint_must_live_past_their_start_up() -> None:
    assert reconcile_component(Path("/usr/bin/python3"), {}).startsecs == UNWATCHED_STARTSECS > 1
