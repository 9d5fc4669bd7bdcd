with instruments as (
    {{ latest_cdc_rows(source('postgres', 'paymentinstrument'), ['id'], '_ab_cdc_lsn') }}
)

select
    id as payment_instrument_id,
    customerid as customer_id,
    paymentmethodid as payment_method_id,
    brand,
    last4,
    expirymonth as expiry_month,
    expiryyear as expiry_year,
    createdat as created_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from instruments
