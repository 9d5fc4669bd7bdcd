with merchants as (
    {{ latest_cdc_rows(source('mongodb', 'merchant'), [raw_col('_id')], '_ab_cdc_cursor') }}
)

select
    {{ raw_col('_id') }} as merchant_document_id,
    {{ raw_col('oltp_id') }} as merchant_id,
    {{ raw_col('name') }} as merchant_name,
    {{ raw_col('industry') }} as industry_name,
    cast({{ json_text(raw_col('rating'), 'average') }} as {{ dbt.type_float() }}) as average_rating,
    {{ raw_col('lastUpdated') }} as updated_at,
    _airbyte_extracted_at as extracted_at
from merchants
