"""``python -m data_pipeline`` runs the same Typer app as ``cxr data``."""

from data_pipeline.cli import app

if __name__ == "__main__":
    app()
