-- Each customer's completed spend in EUR over the trailing window (var segment_window_days, 365)
-- ending at the latest payment in the data, and the spend rank that CustomerSegment uses. The
-- window ends at the data's last payment rather than today so that a rebuild is reproducible.
with completed as (
    select customer_id, transaction_date, amount_eur
    from {{ ref('int_transactions') }}
    where is_completed
),

window_end as (
    select max(transaction_date) as last_date from completed
),

trailing_spend as (
    select
        c.customer_id,
        sum(c.amount_eur) as trailing_spend_eur,
        count(*) as trailing_transaction_count
    from completed as c
    cross join window_end as w
    where c.transaction_date > {{ dbt.dateadd('day', -var('segment_window_days'), 'w.last_date') }}
    group by c.customer_id
),

lifetime as (
    select
        customer_id,
        min(transaction_date) as first_transaction_date,
        max(transaction_date) as last_transaction_date,
        sum(amount_eur) as lifetime_spend_eur
    from completed
    group by customer_id
)

select
    l.customer_id,
    l.first_transaction_date,
    l.last_transaction_date,
    l.lifetime_spend_eur,
    coalesce(t.trailing_spend_eur, 0) as trailing_spend_eur,
    coalesce(t.trailing_transaction_count, 0) as trailing_transaction_count,
    case
        when t.customer_id is null then null
        else percent_rank() over (
            partition by case when t.customer_id is null then 0 else 1 end
            order by t.trailing_spend_eur desc
        )
    end as trailing_spend_rank
from lifetime as l
left join trailing_spend as t on l.customer_id = t.customer_id
