-- The pre-aggregated FACT_CustomerSegmentation adds up to the per-payment FACT_Revenue: same number
-- of completed payments, same EUR total (cents rounding allowed per group).
with segmentation as (
    select sum(TransactionCount) as payments, sum(TotalSpent) as spent, count(*) as groups
    from {{ ref('FACT_CustomerSegmentation') }}
),

revenue as (
    select sum(case when Status = 'completed' then 1 else 0 end) as payments, sum(Amount) as spent
    from {{ ref('FACT_Revenue') }}
)

select segmentation.payments, revenue.payments as revenue_payments, segmentation.spent, revenue.spent as revenue_spent
from segmentation cross join revenue
where segmentation.payments != revenue.payments
   or abs(coalesce(segmentation.spent, 0) - coalesce(revenue.spent, 0)) > 0.005 * (segmentation.groups + revenue.payments) + 0.01
