"""GitOps delivery: the stage model files, promotion gates, promote/rollback commits and canary analysis.

The overlay files under ``k8s/overlays/<stage>/model.yaml`` are the single source of truth for
which model version each stage serves; everything here either writes them through a git commit
or makes a running stack follow them.
"""
