#!/bin/bash
# Runs once, when the data volume is first initialised (docker-entrypoint-initdb.d).
# - warehouse: the raw layer and marts of the `compose` profile (STRIPE_PLATFORM_WAREHOUSE=postgres);
# - airflow:   Airflow's metadata database, with its own login. Its scheduler heartbeats are not
#              payment data: that role logs DDL only, so the audit log (log_statement=all) stays
#              readable for the platform's own databases.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v airflow_password="${AIRFLOW_DB_PASSWORD:?}" <<'SQL'
CREATE DATABASE warehouse;
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
ALTER ROLE airflow SET log_statement = 'ddl';
CREATE DATABASE airflow OWNER airflow;
SQL
