-- One row per CustomerReview document, keyed like the other facts so ratings can be cut by
-- merchant industry and size, location and date.
select
    r.review_id as ID,
    {{ date_key('r.review_date') }} as DateKey,
    r.merchant_id as MerchantKey,
    r.customer_id as CustomerKey,
    m.location_id as LocationKey,
    r.transaction_id as TransactionID,
    cast(r.rating as integer) as Rating
from {{ ref('int_merchant_reviews') }} as r
left join {{ ref('stg_postgres__merchants') }} as m on r.merchant_id = m.merchant_id
