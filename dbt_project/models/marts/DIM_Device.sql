select
    device_id as DeviceKey,
    customer_id as CustomerKey,
    device_type as DeviceType,
    os as OS,
    os_version as OSVersion,
    browser as Browser,
    browser_version as BrowserVersion,
    {{ utc_date('first_seen_at') }} as FirstSeenDate
from {{ ref('stg_postgres__devices') }}
