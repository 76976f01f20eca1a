"""``python -m workflows``: the ``cxr pipeline`` commands alone (the stack's ``scheduler`` runs this).

Lighter than ``cxr``, which imports every package's CLI, for a process that stays up all day.
"""

from workflows.pipeline_cli import app

app(prog_name="python -m workflows")
