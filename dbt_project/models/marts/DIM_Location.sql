select
    location_id as LocationKey,
    city as City,
    region as Region,
    country as Country,
    country_code as CountryCode,
    cast(latitude as numeric(9, 6)) as Latitude,
    cast(longitude as numeric(9, 6)) as Longitude
from {{ ref('stg_postgres__locations') }}
