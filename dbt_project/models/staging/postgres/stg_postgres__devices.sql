with devices as (
    {{ latest_cdc_rows(source('postgres', 'device'), ['id'], '_ab_cdc_lsn') }}
)

select
    id as device_id,
    customerid as customer_id,
    devicetype as device_type,
    os,
    osversion as os_version,
    browser,
    browserversion as browser_version,
    firstseenat as first_seen_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from devices
