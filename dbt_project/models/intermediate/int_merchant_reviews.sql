-- CustomerReview documents linked to the OLTP keys: reviews name customers and merchants by their
-- document ids, whose documents carry the OLTP id (oltp_id).
select
    r.review_id,
    r.transaction_id,
    c.customer_id,
    m.merchant_id,
    r.rating,
    r.reviewed_at,
    r.review_date,
    r.extracted_at
from {{ ref('stg_mongodb__customer_reviews') }} as r
left join {{ ref('stg_mongodb__customers') }} as c
    on r.customer_document_id = c.customer_document_id
left join {{ ref('stg_mongodb__merchants') }} as m
    on r.merchant_document_id = m.merchant_document_id
