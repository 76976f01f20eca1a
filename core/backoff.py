"""The retry delay every queue of the platform waits between tries (the PACS outbox, its per-PACS
hold, the DIMSE SCP's hand-over to the gateway): one definition, below the packages that use it."""

from __future__ import annotations


def backoff(first_s: float, failures: int, max_s: float) -> float:
    """``first_s`` doubled per failure before the last (``failures`` >= 1), at most ``max_s``.

    The exponent is bounded: ``first_s * 2**n`` is a float, and past n ~ 1024 (a PACS down for 3.5 days
    at the 5-minute cap) it raised OverflowError, so no retry time was written and the item was offered
    again on every pass.
    """
    return min(first_s * 2.0 ** min(max(failures - 1, 0), 64), max_s)


def still_waiting(until: float, now: float, max_s: float) -> bool:
    """Whether a wait set to end at ``until`` (wall clock) lasts past ``now``.

    No wait is ever set longer than ``max_s``: one ending further ahead was set before the clock
    stepped back (a wrong RTC at boot, corrected by NTP) and is over, not waited for as long as the step.
    """
    return now < until <= now + max_s
