"""Set-up run in every worker process of a LOCAL Ray started for training, before any actor code.

``ray.init`` names :func:`quiet_local_ray_workers` by module path as the job's
``worker_process_setup_hook`` (training/ray_trainer.py, ``ray_init_kwargs``), so Ray imports this
module in each worker process: keep it to the standard library.
"""

from __future__ import annotations

import logging

#: Ray Train V2's placement-group cleaner asks Ray's State API every 2 s whether the controller is
#: alive. A local Ray here starts without the dashboard that serves that API (``include_dashboard``
#: is False: two cores), so the cleaner logs "Failed to query Ray Train Controller actor state"
#: every 2 s for the whole run: 153 of the 568 lines the first ``make up`` printed (2026-12-05).
#: Nothing relies on it locally: the driver shuts its local Ray down after ``fit`` (its placement
#: groups with it) and ``cxr train tune`` removes its job's groups at the end of a search
#: (training/tune.py). On a cluster the dashboard runs, the cleaner works, and this hook is not set.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_ray_workers() -> None:
    """Keep the cleaner's errors, drop its every-2-s warning (module docstring)."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
