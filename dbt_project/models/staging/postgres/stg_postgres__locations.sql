select
    id as location_id,
    city,
    region,
    country,
    countrycode as country_code,
    cast(latitude as {{ dbt.type_float() }}) as latitude,
    cast(longitude as {{ dbt.type_float() }}) as longitude
from {{ source('postgres', 'location') }}
