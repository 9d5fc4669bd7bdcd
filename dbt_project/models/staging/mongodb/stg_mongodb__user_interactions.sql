-- One row per session. The customer link is not part of the brief's document shape: the seed puts
-- it in an extra field, which the sync keeps in `_extra`.
with sessions as (
    {{ latest_cdc_rows(source('mongodb', 'userinteractiondata'), [raw_col('_id')], '_ab_cdc_cursor') }}
)

select
    {{ raw_col('_id') }} as session_document_id,
    {{ raw_col('session_id') }} as session_id,
    {{ json_text(raw_col('_extra'), 'customer_id') }} as customer_document_id,
    {{ raw_col('session_start') }} as session_started_at,
    {{ utc_date(raw_col('session_start')) }} as session_date,
    {{ json_text(raw_col('device'), 'type') }} as device_type,
    {{ json_text(raw_col('device'), 'os') }} as os,
    {{ json_text(raw_col('device'), 'browser') }} as browser,
    {{ json_text(raw_col('location'), 'country') }} as country,
    {{ json_text(raw_col('location'), 'city') }} as city,
    {{ json_array_size(raw_col('events')) }} as event_count,
    cast({{ raw_col('sessionDuration') }} as {{ dbt.type_float() }}) as session_duration_seconds,
    {{ raw_col('isActive') }} as is_active,
    _airbyte_extracted_at as extracted_at
from sessions
