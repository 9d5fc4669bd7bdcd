-- The marketing audience shared with third parties (meta shared_with_third_parties): customers who
-- gave marketing consent and did not opt out of the sale or sharing of their data (CCPA do not
-- sell, including the Global Privacy Control signal), as the consent registry says at the last
-- sync (stg_postgres__consent). No personal data: a customer key partners match on their side,
-- and the segment attributes of DIM_Customer that are not personal.
with consent as (
    select * from {{ ref('stg_postgres__consent') }}
),

marketing as (
    select customer_id from consent where purpose = 'marketing' and granted
),

opted_out as (
    select customer_id from consent where purpose = 'sale' and not granted
)

select
    c.CustomerKey,
    c.CountryCode,
    c.PreferredDevice,
    c.PreferredCurrency,
    c.CustomerSegment
from {{ ref('DIM_Customer') }} as c
inner join marketing on marketing.customer_id = c.CustomerKey
left join opted_out on opted_out.customer_id = c.CustomerKey
where opted_out.customer_id is null
