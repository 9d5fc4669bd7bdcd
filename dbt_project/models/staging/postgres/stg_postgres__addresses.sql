with addresses as (
    {{ latest_cdc_rows(source('postgres', 'address'), ['id'], '_ab_cdc_lsn') }}
)

select
    id as address_id,
    customerid as customer_id,
    postalcode as postal_code,
    locationid as location_id,
    isbilling as is_billing,
    createdat as created_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from addresses
