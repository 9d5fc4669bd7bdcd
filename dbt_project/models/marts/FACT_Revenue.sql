-- One row per payment (ID = the OLTP transaction id), merged on ID as payments change status.
-- Money is in EUR (seed currency_rates); LocalAmount keeps the payment's own currency. Revenue is
-- recognised when a payment is completed: Amount, TaxAmount and NetAmount are 0 otherwise (refunded,
-- failed, charged back...), GrossAmount is the attempted amount whatever the status.
-- TaxAmount: amounts are tax-inclusive, so tax = amount * rate / (1 + rate), with the consumption-tax
-- rate of the country the payment happened in (seed country_tax_rates).
{{
    config(
        materialized='incremental',
        unique_key='ID',
        incremental_strategy='merge',
        on_schema_change='fail',
        post_hook="delete from {{ this }} where not exists (select 1 from {{ ref('int_transactions') }} as t where t.transaction_id = {{ this }}.ID)"
    )
}}

select
    transaction_id as ID,
    date_key as DateKey,
    merchant_id as MerchantKey,
    location_id as LocationKey,
    customer_id as CustomerKey,
    payment_method_id as PaymentMethodKey,
    currency_id as CurrencyKey,
    cast(status_name as varchar) as Status,
    cast(local_amount as numeric(18, 2)) as LocalAmount,
    cast(amount_eur as numeric(18, 2)) as GrossAmount,
    cast(case when is_completed then amount_eur else 0 end as numeric(18, 2)) as Amount,
    cast(case when is_completed then tax_amount_eur else 0 end as numeric(18, 2)) as TaxAmount,
    cast(case when is_completed then amount_eur - tax_amount_eur else 0 end as numeric(18, 2)) as NetAmount,
    cast(tax_rate as numeric(6, 4)) as TaxRate,
    extracted_at as ExtractedAt
from {{ ref('int_transactions') }}
{% if is_incremental() %}
where extracted_at > {{ watermark('ExtractedAt') }}
{% endif %}
