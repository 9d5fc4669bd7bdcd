-- Merchants with their industry and size names (the brief filters on Industry and Size), the
-- rating of the OLTP record and the review statistics of the CustomerReview documents.
with reviews as (
    select merchant_id, count(*) as review_count, avg(rating) as average_review_rating
    from {{ ref('int_merchant_reviews') }}
    group by merchant_id
)

select
    m.merchant_id as MerchantKey,
    m.merchant_name as Name,
    i.industry_name as Industry,
    s.merchant_size_name as Size,
    m.merchant_category_code as MerchantCategoryCode,
    m.location_id as LocationKey,
    cast(m.rating as numeric(4, 2)) as Rating,
    cast(coalesce(r.review_count, 0) as integer) as ReviewCount,
    cast(r.average_review_rating as numeric(4, 2)) as AverageReviewRating,
    {{ utc_date('m.created_at') }} as OnboardedDate
from {{ ref('stg_postgres__merchants') }} as m
left join {{ ref('stg_postgres__industries') }} as i on m.industry_id = i.industry_id
left join {{ ref('stg_postgres__merchant_sizes') }} as s on m.merchant_size_id = s.merchant_size_id
left join reviews as r on m.merchant_id = r.merchant_id
