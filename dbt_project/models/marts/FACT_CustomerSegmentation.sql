-- Completed payments pre-aggregated per day, customer and location (the brief's pre-aggregation):
-- TransactionCount and TotalSpent (EUR). Incremental: each run recomputes the days that changed.
-- depends_on: {{ source('postgres', 'transaction') }}
{{
    config(
        materialized='incremental',
        unique_key='DateKey',
        incremental_strategy='delete+insert',
        on_schema_change='fail',
        pre_hook="{% if is_incremental() %}delete from {{ this }} where DateKey in ({{ changed_date_keys() }}){% endif %}"
    )
}}

with transactions as (
    select * from {{ ref('int_transactions') }}
    where is_completed
    {% if is_incremental() %}
      and date_key in ({{ changed_date_keys() }})
    {% endif %}
)

select
    cast({{ dbt.hash(dbt.concat(["cast(date_key as " ~ dbt.type_string() ~ ")", "'|'", "cast(customer_id as " ~ dbt.type_string() ~ ")", "'|'", "cast(location_id as " ~ dbt.type_string() ~ ")"])) }} as varchar) as ID,
    date_key as DateKey,
    customer_id as CustomerKey,
    location_id as LocationKey,
    cast(count(*) as integer) as TransactionCount,
    cast(sum(amount_eur) as numeric(18, 2)) as TotalSpent,
    max(extracted_at) as LastExtractedAt
from transactions
group by date_key, customer_id, location_id
