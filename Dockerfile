# syntax=docker/dockerfile:1.7
# The project image: gateway, `cxr` CLI and training in one image (non-root, no build tools).
# Built by `make image` and .github/workflows/image.yml as ghcr.io/cxr-detect/cxr-detect:<IMAGE_TAG>;
# not on the development machines (no Docker engine there). openssh-client: promote pushes to the
# GitOps repository over SSH; the `cluster` extra: MLflow's PostgreSQL driver (psycopg).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY requirements/ requirements/
COPY core/ core/
COPY data_pipeline/ data_pipeline/
COPY training/ training/
COPY serving/ serving/
COPY delivery/ delivery/
COPY workflows/ workflows/
COPY stack/ stack/
COPY cxr/ cxr/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 -c requirements/lock.txt \
 && /opt/venv/bin/pip install --no-cache-dir ".[cluster]" -c requirements/lock.txt

FROM ${PYTHON_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 git openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin cxr
COPY --from=build /opt/venv /opt/venv
COPY k8s/ /app/k8s/
COPY training/configs/ /app/training/configs/
WORKDIR /app
# HOME=/tmp: every `cxr` command writes ~/ray_bootstrap_config.yaml first (core/offline.py), and
# the pods run with a read-only root where only /tmp (an emptyDir, or compose's tmpfs) is writable.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    YOLO_OFFLINE=1 \
    YOLO_CONFIG_DIR=/tmp/ultralytics \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    CXR_GITOPS_DIR=/app
USER 10001
EXPOSE 8080
ENTRYPOINT ["cxr"]
CMD ["serve", "--backend", "triton", "--host", "0.0.0.0", "--port", "8080"]
