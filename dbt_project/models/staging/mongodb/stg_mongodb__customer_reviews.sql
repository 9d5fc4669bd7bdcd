with reviews as (
    {{ latest_cdc_rows(source('mongodb', 'customerreview'), [raw_col('_id')], '_ab_cdc_cursor') }}
)

select
    {{ raw_col('_id') }} as review_id,
    {{ raw_col('transaction_id') }} as transaction_id,
    {{ raw_col('customer_id') }} as customer_document_id,
    {{ raw_col('merchant_id') }} as merchant_document_id,
    cast({{ raw_col('rating') }} as integer) as rating,
    {{ raw_col('message') }} as message,
    {{ raw_col('timestamp') }} as reviewed_at,
    {{ utc_date(raw_col('timestamp')) }} as review_date,
    _airbyte_extracted_at as extracted_at
from reviews
