-- Email, full name and phone stay encrypted (pgcrypto ciphertext): the warehouse never holds them
-- in clear. The keyed email hash is kept as a pseudonymous join key.
with customers as (
    {{ latest_cdc_rows(source('postgres', 'customer'), ['id'], '_ab_cdc_lsn') }}
)

select
    id as customer_id,
    username as user_name,
    emailhash as email_hash,
    countrycode as country_code,
    preferreddevice as preferred_device,
    preferredpaymentmethodid as preferred_payment_method_id,
    preferredcurrencyid as preferred_currency_id,
    createdat as created_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from customers
