select
    id as payment_method_id,
    name as payment_method_name,
    iscard as is_card
from {{ source('postgres', 'paymentmethod') }}
