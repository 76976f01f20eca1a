"""The fixtures start the real servers, with the stack's own flags, on loopback."""

from __future__ import annotations

import time
import urllib.request

import pytest
from minio import Minio
from minio.error import S3Error

pytestmark = pytest.mark.integration


def test_s3_store_rejects_a_wrong_secret_and_accepts_the_generated_one(s3_store) -> None:
    host = s3_store.endpoint.removeprefix("http://")
    good = Minio(host, s3_store.access_key, s3_store.secret_key, secure=False, region="us-east-1")
    assert good.bucket_exists("cxr") and good.bucket_exists("mlflow")
    bad = Minio(host, s3_store.access_key, "not-the-secret", secure=False, region="us-east-1")
    with pytest.raises(S3Error) as err:
        bad.list_objects("cxr").__next__()
    assert err.value.code in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}


def test_mlflow_server_answers_health_and_search(mlflow_server) -> None:
    with urllib.request.urlopen(f"{mlflow_server.uri}/health", timeout=5) as resp:
        assert resp.status == 200
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    experiment_id = client.create_experiment(f"fixture-check-{time.time_ns()}")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "answer", 42.0)
    assert client.get_run(run.info.run_id).data.metrics == {"answer": 42.0}


def test_triton_starts_in_explicit_mode_with_an_empty_repository(triton_factory) -> None:
    server = triton_factory("staging")
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=5) as resp:
        assert resp.status == 200
