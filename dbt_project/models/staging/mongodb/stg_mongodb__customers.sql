-- The document's email (encrypted at rest, docstore/fields.py) and its keyed hash are left out: the
-- marts join customers by oltp_id.
with customers as (
    {{ latest_cdc_rows(source('mongodb', 'customer'), [raw_col('_id')], '_ab_cdc_cursor') }}
)

select
    {{ raw_col('_id') }} as customer_document_id,
    {{ raw_col('oltp_id') }} as customer_id,
    {{ raw_col('userName') }} as user_name,
    {{ json_text(raw_col('preferences'), 'device') }} as preferred_device,
    {{ json_text(raw_col('preferences'), 'paymentMethod') }} as preferred_payment_method,
    {{ json_text(raw_col('preferences'), 'currency') }} as preferred_currency,
    {{ raw_col('lastUpdated') }} as updated_at,
    _airbyte_extracted_at as extracted_at
from customers
