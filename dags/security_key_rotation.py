"""Key rotation, monthly (the brief: keys per database and per table with regular rotation):
each OLTP table's data key gets a new version and its data is re-encrypted in the background,
the old version retired; then every store's key-encryption key is rotated and every data key
re-wrapped under it (stripe_platform.orchestration.key_rotation; docs/security.md)."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from stripe_platform.orchestration.defaults import default_args


@dag(
    dag_id="security_key_rotation",
    schedule="0 3 1 * *",
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(execution_timeout=dt.timedelta(hours=6)),
    tags=["security", "keys"],
    doc_md=__doc__,
)
def security_key_rotation() -> None:
    @task
    def rotate_table_keys() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.key_rotation import rotate_table_keys

        return rotate_table_keys(load_settings())

    @task
    def rewrap_data_keys() -> dict:
        from stripe_platform.config import load_settings
        from stripe_platform.orchestration.key_rotation import rewrap_data_keys

        return rewrap_data_keys(load_settings())

    rotate_table_keys() >> rewrap_data_keys()


security_key_rotation()
