-- FACT_Revenue recognises exactly the completed payments of the OLTP store: as many rows with
-- revenue, and the same EUR total (per-row rounding to cents allowed), computed here from staging.
with expected as (
    select
        count(*) as payments,
        sum(t.amount * r.eur_per_unit) as amount_eur
    from {{ ref('stg_postgres__transactions') }} as t
    inner join {{ ref('stg_postgres__transaction_statuses') }} as s on t.status_id = s.status_id
    inner join {{ ref('stg_postgres__currencies') }} as c on t.currency_id = c.currency_id
    inner join {{ ref('currency_rates') }} as r on c.currency_code = r.currency_code
    where s.status_name = 'completed'
),

actual as (
    select
        sum(case when Status = 'completed' then 1 else 0 end) as payments,
        sum(Amount) as amount_eur
    from {{ ref('FACT_Revenue') }}
)

select expected.payments, actual.payments as fact_payments, expected.amount_eur, actual.amount_eur as fact_amount_eur
from expected cross join actual
where expected.payments != actual.payments
   or abs(coalesce(expected.amount_eur, 0) - coalesce(actual.amount_eur, 0)) > 0.005 * expected.payments + 0.01
