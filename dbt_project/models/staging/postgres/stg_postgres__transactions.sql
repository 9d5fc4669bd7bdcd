with transactions as (
    {{ latest_cdc_rows(source('postgres', 'transaction'), ['id', 'datetime'], '_ab_cdc_lsn') }}
)

select
    id as transaction_id,
    transactionstatusid as status_id,
    merchantid as merchant_id,
    cast(amount as {{ dbt.type_numeric() }}) as amount,
    currencyid as currency_id,
    paymentmethodid as payment_method_id,
    paymentinstrumentid as payment_instrument_id,
    deviceid as device_id,
    customerid as customer_id,
    billingaddressid as billing_address_id,
    transactionlocationid as location_id,
    ipaddress as ip_address,
    datetime as transacted_at,
    {{ utc_date('datetime') }} as transaction_date,
    createdat as created_at,
    updatedat as updated_at,
    _airbyte_extracted_at as extracted_at
from transactions
