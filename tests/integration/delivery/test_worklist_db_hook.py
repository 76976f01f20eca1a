"""The cluster's worklist database, from its manifests, against a real PostgreSQL.

The hook Job (k8s/base/postgres/worklist-db-job.yaml) runs its own script here, with psql, as the
cluster's admin; then the gateway connects the way its Deployment says (CXR_WORKLIST_URL without a
password, PGPASSWORD from the secret) and records a study. No Kubernetes runs here: the parts are
checked against each other.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml

from serving.triage.worklist import WorklistStore
from serving.triage.worklist_db import PostgresWorklistDb
from tests.fixtures.postgres import PostgresServer, pg_bin

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]


def _container(path: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / path).read_text())
    [container] = doc["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _run_hook(server: PostgresServer, password: str) -> subprocess.CompletedProcess[str]:
    hook = _container("k8s/base/postgres/worklist-db-job.yaml")
    assert hook["command"] == ["/bin/bash", "-c"]
    command_line = hook["args"][0].split("<<", 1)[0]
    assert "WORKLIST_PASSWORD" not in command_line  # never in psql's argv, which ps shows
    env = {
        **os.environ,
        **_env(hook),
        "PATH": f"{Path(pg_bin('psql')).parent}:{os.environ['PATH']}",
        "PGHOST": server.host,
        "PGPORT": str(server.port),
        "PGDATABASE": "postgres",  # the cluster's is mlflow, which this server does not hold
        "PGUSER": server.user,
        "PGPASSWORD": server.password,
        "WORKLIST_PASSWORD": password,
    }
    return subprocess.run(
        ["/bin/bash", "-c", hook["args"][0]], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_hook_makes_the_gateways_role_and_database_and_the_gateway_uses_them(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for password in ("first-pw", "rotated-pw"):  # idempotent, and a rotated secret takes effect
        done = _run_hook(postgres_server, password)
        assert done.returncode == 0, done.stderr
    gateway = _env(_container("k8s/base/gateway/deployment.yaml"))
    url = urlsplit(gateway["CXR_WORKLIST_URL"])
    assert url.password is None and url.hostname == "postgres"  # the password comes from PGPASSWORD
    here = url._replace(netloc=f"{url.username}@{postgres_server.host}:{postgres_server.port}").geturl()
    monkeypatch.setenv("PGPASSWORD", "rotated-pw")
    store = WorklistStore(PostgresWorklistDb(here))
    try:
        row = store.record("t", "1.2.3", ["r1"], [0.7], "7", "production", 0.5)
        assert store.get("t", "1.2.3") == row and row.priority
    finally:
        store.close()
    with pytest.raises(psycopg.OperationalError):  # the first password no longer works
        psycopg.connect(here, password="first-pw").close()
    other = url._replace(
        netloc=f"{url.username}@{postgres_server.host}:{postgres_server.port}", path="/postgres"
    ).geturl()
    with pytest.raises(psycopg.OperationalError, match="permission denied"):  # its database only
        psycopg.connect(other, password="rotated-pw").close()
