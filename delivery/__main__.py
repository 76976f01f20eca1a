"""``python -m delivery``: delivery commands without the root ``cxr`` (used by the cluster jobs)."""

from delivery.cli import app

if __name__ == "__main__":
    app()
