-- What holds now per customer and purpose: the latest record (by when the customer decided, then
-- the record id), as compliance/consent.py reads it in the OLTP store. Purposes without a record
-- have no row: for analytics, ml_training and marketing that is no consent; for sale, not opted
-- out.
with records as (
    {{ latest_cdc_rows(source('postgres', 'consent'), ['id'], '_ab_cdc_lsn') }}
),

ranked as (
    select
        records.*,
        row_number() over (
            partition by customerid, purpose order by recordedat desc, id desc
        ) as decision_rank
    from records
)

select
    customerid as customer_id,
    purpose,
    granted,
    source,
    recordedat as recorded_at,
    _airbyte_extracted_at as extracted_at
from ranked
where decision_rank = 1
