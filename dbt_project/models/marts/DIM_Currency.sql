select
    c.currency_id as CurrencyKey,
    c.currency_code as Code,
    c.currency_name as Name,
    c.currency_symbol as Symbol,
    c.minor_units as MinorUnits,
    cast(r.eur_per_unit as numeric(18, 8)) as EurPerUnit
from {{ ref('stg_postgres__currencies') }} as c
left join {{ ref('currency_rates') }} as r on c.currency_code = r.currency_code
