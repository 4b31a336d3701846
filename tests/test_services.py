"""The test services are real: each one answers its own protocol."""

from __future__ import annotations

import mlflow
import psycopg2


def test_postgres_accepts_connections(postgres):
    assert postgres.url.startswith("postgresql+psycopg2://")
    with psycopg2.connect(postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_database(), inet_server_addr()::text")
        db, addr = cur.fetchone()
    conn.close()
    assert db == "fcpts"
    assert addr.split("/")[0] == "127.0.0.1"


def test_mlflow_sqlite_server_logs_run_and_metric(mlflow_sqlite_server):
    client = mlflow.MlflowClient(tracking_uri=mlflow_sqlite_server.tracking_uri)
    exp_id = client.create_experiment("services-sqlite")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.25, step=3)
    client.set_terminated(run.info.run_id)

    got = client.get_run(run.info.run_id)
    assert got.data.metrics == {"loss": 0.25}
    assert got.info.status == "FINISHED"
    assert mlflow_sqlite_server.backend_store_uri.startswith("sqlite:///")


def test_mlflow_pg_s3_server_stores_artifacts_in_s3(mlflow_pg_s3_server, moto_server, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=mlflow_pg_s3_server.tracking_uri)
    exp_id = client.create_experiment("services-pg-s3")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "sparsity", 0.5)
    report = tmp_path / "report.txt"
    report.write_text("hello from fcpts")
    client.log_artifact(run.info.run_id, str(report), artifact_path="reports")

    assert [f.path for f in client.list_artifacts(run.info.run_id, "reports")] == [
        "reports/report.txt"
    ]
    bucket, prefix = mlflow_pg_s3_server.artifacts_destination[len("s3://") :].split("/", 1)
    keys = [
        o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    ]
    matching = [
        k
        for k in keys
        if k.startswith(prefix + "/")
        and k.endswith(f"{run.info.run_id}/artifacts/reports/report.txt")
    ]
    assert len(matching) == 1, keys
    body = moto_server.client().get_object(Bucket=bucket, Key=matching[0])["Body"].read()
    assert body == b"hello from fcpts"
    assert mlflow_pg_s3_server.backend_store_uri.startswith("postgresql+psycopg2://")
