"""The one-machine stack: supervised loopback servers (S3, MLflow, Tritons, gateway, Prometheus).

Also their credentials and the first model. ``cxr stack up|down|status|logs``;
the cluster runs the same parts from ``k8s/``.
"""
