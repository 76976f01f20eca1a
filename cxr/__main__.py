"""``python -m cxr`` runs the root command."""

from cxr.cli import main

main()
