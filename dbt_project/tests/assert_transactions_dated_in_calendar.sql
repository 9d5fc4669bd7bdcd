-- Every payment's day is in DIM_Date: a payment outside vars date_spine_start..date_spine_end would
-- silently drop out of the brief's queries (they join facts to DIM_Date).
select t.transaction_id, t.transaction_date
from {{ ref('int_transactions') }} as t
left join {{ ref('DIM_Date') }} as d on t.date_key = d.DateKey
where d.DateKey is null
