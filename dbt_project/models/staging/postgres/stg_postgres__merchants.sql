with merchants as (
    {{ latest_cdc_rows(source('postgres', 'merchant'), ['id'], '_ab_cdc_lsn') }}
)

select
    id as merchant_id,
    name as merchant_name,
    industryid as industry_id,
    merchantsizeid as merchant_size_id,
    cast(rating as {{ dbt.type_float() }}) as rating,
    merchantcategorycode as merchant_category_code,
    locationid as location_id,
    createdat as created_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from merchants
