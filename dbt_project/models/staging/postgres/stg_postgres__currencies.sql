select
    id as currency_id,
    code as currency_code,
    name as currency_name,
    symbol as currency_symbol,
    minorunits as minor_units
from {{ source('postgres', 'currency') }}
