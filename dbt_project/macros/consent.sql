{#- A mart shared with third parties (config meta shared_with_third_parties: true) holds only
    customers who gave marketing consent and did not opt out of sale or sharing (CCPA do not
    sell), as stg_postgres__consent says now (issue 23, compliance/consent.py). Attached to the
    mart's customer column: the rows it returns are customers that must not be there. -#}
{% test shared_only_with_consent(model, column_name) %}
with consent as (
    select * from {{ ref('stg_postgres__consent') }}
),

marketing as (
    select customer_id from consent where purpose = 'marketing' and granted
),

opted_out as (
    select customer_id from consent where purpose = 'sale' and not granted
)

select shared.{{ column_name }}
from {{ model }} as shared
left join marketing on marketing.customer_id = shared.{{ column_name }}
left join opted_out on opted_out.customer_id = shared.{{ column_name }}
where marketing.customer_id is null or opted_out.customer_id is not null
{% endtest %}
