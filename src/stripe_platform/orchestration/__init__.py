"""What the DAGs in dags/ are made of, kept importable without Airflow where possible.

- ``defaults``: owner, retries with exponential backoff, timeouts, pools (no Airflow import);
- ``alerts``: the failure callback: log, then POST JSON to ``STRIPE_PLATFORM_ALERT_WEBHOOK_URL``;
- ``assets``: the Assets the DAGs publish (imports ``airflow.sdk``);
- ``syncs``: the one sync-task factory (embedded engine, or Airbyte's deferrable operator on prod);
- ``maintenance``: the OLTP partition and document index jobs (no Airflow import);
- ``airflow_runtime``: the embedded Airflow (SQLite metadata under the platform home), its
  ``airflow db migrate`` and ``airflow standalone``.

Nothing is imported here: a DAG file pays only for what it uses.
"""
