-- One row per user session (UserInteractionData): device and place of use, length and activity.
with sessions as (
    select * from {{ ref('stg_mongodb__user_interactions') }}
),

customers as (
    select customer_document_id, customer_id from {{ ref('stg_mongodb__customers') }}
)

select
    s.session_document_id as ID,
    s.session_id as SessionID,
    {{ date_key('s.session_date') }} as DateKey,
    c.customer_id as CustomerKey,
    s.device_type as DeviceType,
    s.os as OS,
    s.browser as Browser,
    s.country as Country,
    s.city as City,
    cast(s.event_count as integer) as EventCount,
    cast(s.session_duration_seconds as numeric(12, 1)) as DurationSeconds,
    s.is_active as IsActive
from sessions as s
left join customers as c on s.customer_document_id = c.customer_document_id
