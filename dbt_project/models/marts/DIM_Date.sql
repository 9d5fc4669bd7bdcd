-- The calendar every fact joins on, one row per day over vars date_spine_start..date_spine_end.
-- Day and Month are zero-padded text ('01'..'31', '01'..'12') so that ORDER BY Year, Month is
-- chronological, as the brief's queries expect; their names are in DayName and MonthName.
-- isHoliday: a national public holiday in at least one country the platform operates in
-- (HolidayCountries lists which).
with days as (
    {{ dbt.date_spine('day', "cast('" ~ var('date_spine_start') ~ "' as date)", "cast('" ~ var('date_spine_end') ~ "' as date)") }}
),

calendar as (
    select cast(date_day as date) as full_date from days
),

holidays as (
    select
        holiday_date,
        {{ dbt.listagg('country_code', "','", "order by country_code") }} as holiday_countries
    from (select distinct holiday_date, country_code from {{ ref('holidays') }}) as h
    group by holiday_date
),

parts as (
    select
        c.full_date,
        cast(extract(year from c.full_date) as integer) as year_number,
        cast(extract(month from c.full_date) as integer) as month_number,
        cast(extract(day from c.full_date) as integer) as day_number,
        {{ day_of_week('c.full_date') }} as day_of_week,
        h.holiday_countries
    from calendar as c
    left join holidays as h on c.full_date = h.holiday_date
)

select
    {{ date_key('full_date') }} as DateKey,
    full_date as FullDate,
    lpad(cast(day_number as {{ dbt.type_string() }}), 2, '0') as Day,
    lpad(cast(month_number as {{ dbt.type_string() }}), 2, '0') as Month,
    cast(extract(quarter from full_date) as integer) as Quarter,
    year_number as Year,
    holiday_countries is not null as isHoliday,
    day_of_week in (0, 6) as isWeekend,
    case day_of_week
        when 0 then 'Sunday' when 1 then 'Monday' when 2 then 'Tuesday' when 3 then 'Wednesday'
        when 4 then 'Thursday' when 5 then 'Friday' else 'Saturday'
    end as DayName,
    case month_number
        when 1 then 'January' when 2 then 'February' when 3 then 'March' when 4 then 'April'
        when 5 then 'May' when 6 then 'June' when 7 then 'July' when 8 then 'August'
        when 9 then 'September' when 10 then 'October' when 11 then 'November' else 'December'
    end as MonthName,
    holiday_countries as HolidayCountries
from parts
