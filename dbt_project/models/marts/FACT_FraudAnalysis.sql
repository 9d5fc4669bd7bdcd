-- Fraud per day, customer, merchant, location and payment method. FraudCount counts the payments
-- labelled fraudulent (isFraud in the scored Transaction documents); ChargebackCount the payments
-- whose dispute was lost, the OLTP side of fraud. Feeds the CDC micro-batches of cdc_fraud_stream:
-- each run recomputes only the days that received changes.
-- depends_on: {{ source('postgres', 'transaction') }}
{{
    config(
        materialized='incremental',
        unique_key='DateKey',
        incremental_strategy='delete+insert',
        on_schema_change='fail',
        pre_hook="{% if is_incremental() %}delete from {{ this }} where DateKey in ({{ changed_date_keys() }}){% endif %}",
        tags=['fraud']
    )
}}

with transactions as (
    select * from {{ ref('int_transactions') }}
    {% if is_incremental() %}
    where date_key in ({{ changed_date_keys() }})
    {% endif %}
)

select
    cast({{ dbt.hash(dbt.concat(["cast(date_key as " ~ dbt.type_string() ~ ")", "'|'", "cast(customer_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(merchant_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(location_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(payment_method_id as " ~ dbt.type_string() ~ ")"])) }} as varchar) as ID,
    date_key as DateKey,
    customer_id as CustomerKey,
    merchant_id as MerchantKey,
    location_id as LocationKey,
    payment_method_id as PaymentMethodKey,
    cast(sum(case when is_fraud then 1 else 0 end) as integer) as FraudCount,
    cast(sum(case when is_charged_back then 1 else 0 end) as integer) as ChargebackCount,
    cast(count(*) as integer) as TransactionCount,
    cast(sum(case when is_fraud then amount_eur else 0 end) as numeric(18, 2)) as FraudAmount,
    max(extracted_at) as LastExtractedAt
from transactions
group by date_key, customer_id, merchant_id, location_id, payment_method_id
