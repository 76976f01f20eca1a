"""Entry point: ``python -m serving.observability``."""

from serving.observability.cli import app

if __name__ == "__main__":
    app()
