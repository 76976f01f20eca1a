"""``python -m training`` runs the same Typer app as ``cxr train``."""

from training.cli import app

if __name__ == "__main__":
    app()
