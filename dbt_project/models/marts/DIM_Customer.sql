-- Customers as they are now (their history is in the customers_snapshot snapshot). No personal data
-- in clear: the OLTP keeps email, name and phone encrypted and the warehouse does not decrypt them.
--
-- CustomerSegment, from behaviour over the trailing 365 days of completed payments (EUR):
--   Premium   the top 10% of customers by trailing spend (var premium_top_share)
--   Regular   every other customer who paid in the trailing window
--   Lapsed    paid before, but not in the trailing window
--   Prospect  never completed a payment
with spend as (
    select * from {{ ref('int_customer_spend') }}
)

select
    c.customer_id as CustomerKey,
    -- The source's UserName is never null; an erased customer's is nulled in the raw layer
    -- (docs/compliance.md): the mart shows the OLTP tombstone's name instead.
    coalesce(c.user_name, 'erased-' || cast(c.customer_id as varchar)) as UserName,
    c.country_code as CountryCode,
    c.preferred_device as PreferredDevice,
    pm.payment_method_name as PreferredPaymentMethod,
    cur.currency_code as PreferredCurrency,
    {{ utc_date('c.created_at') }} as SignupDate,
    s.first_transaction_date as FirstTransactionDate,
    s.last_transaction_date as LastTransactionDate,
    cast(coalesce(s.trailing_spend_eur, 0) as numeric(18, 2)) as TrailingYearSpent,
    case
        when s.customer_id is null then 'Prospect'
        when s.trailing_transaction_count = 0 then 'Lapsed'
        when s.trailing_spend_rank < {{ var('premium_top_share') }} then 'Premium'
        else 'Regular'
    end as CustomerSegment
from {{ ref('stg_postgres__customers') }} as c
left join spend as s on c.customer_id = s.customer_id
left join {{ ref('stg_postgres__payment_methods') }} as pm
    on c.preferred_payment_method_id = pm.payment_method_id
left join {{ ref('stg_postgres__currencies') }} as cur on c.preferred_currency_id = cur.currency_id
