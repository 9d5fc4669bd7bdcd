select
    payment_method_id as PaymentMethodKey,
    payment_method_name as Name,
    is_card as IsCard
from {{ ref('stg_postgres__payment_methods') }}
