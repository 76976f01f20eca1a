"""``python -m serving``."""

from serving.cli import app

if __name__ == "__main__":
    app()
