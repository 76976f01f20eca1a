"""``python -m serving.gitops``: delivery commands without the root ``cxr`` (used by the cluster jobs)."""

from serving.gitops.cli import app

if __name__ == "__main__":
    app()
