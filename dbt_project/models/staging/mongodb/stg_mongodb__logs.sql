-- One row per logged query (the brief's LogData shape); the log lines stay a JSON array.
with logs as (
    {{ latest_cdc_rows(source('mongodb', 'log'), [raw_col('_id')], '_ab_cdc_cursor') }}
)

select
    {{ raw_col('_id') }} as log_id,
    {{ raw_col('query_id') }} as query_id,
    {{ raw_col('user') }} as db_user,
    {{ raw_col('dbname') }} as db_name,
    {{ raw_col('pid') }} as pid,
    {{ raw_col('remote_host') }} as remote_host,
    {{ raw_col('session_id') }} as session_id,
    {{ raw_col('session_start') }} as session_started_at,
    {{ raw_col('application_name') }} as application_name,
    {{ json_array_size(raw_col('lines')) }} as line_count,
    {{ raw_col('lines') }} as lines,
    _airbyte_extracted_at as extracted_at
from logs
