"""Set-up run in every worker process of a LOCAL Ray started for training, before any actor code.

``ray.init`` names :func:`quiet_local_ray_workers` by module path as the job's
``worker_process_setup_hook`` (training/ray_trainer.py, ``ray_init_kwargs``), so Ray imports this
module in each worker process: keep it to the standard library (a hook that fails to import
stops every worker).
"""

from __future__ import annotations

import logging

#: Ray Train V2's placement-group cleaner asks Ray's State API every 2 s whether the controller is
#: alive. A local Ray here starts without the dashboard that serves that API (``include_dashboard``
#: is False: two cores), so the cleaner logs this warning every 2 s for the whole run: 153 of the
#: 568 lines the first ``make up`` printed (2026-12-05). Nothing relies on the cleaner locally: the
#: driver shuts its local Ray down after ``fit`` (its placement groups with it) and ``cxr train
#: tune`` removes its job's groups at the end of a search (training/tune.py). On a cluster the
#: dashboard runs, the cleaner works, and this hook is not set.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
UNREACHABLE_STATE_API = "Failed to query Ray Train Controller actor state"


def _not_the_unreachable_state_api(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(UNREACHABLE_STATE_API)


def quiet_local_ray_workers() -> None:
    """Drop the cleaner's every-2-s "state API unavailable" warning; its other messages stay."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).addFilter(_not_the_unreachable_state_api)
