{#- Small cross-database helpers. dbt's own cross-database macros (dbt.hash, dbt.date_trunc,
    dbt.type_*) cover the rest; these fill the gaps the three targets disagree on. -#}

{#- A raw column by its source name. The raw writers keep the source's spelling: mixed case on
    PostgreSQL (quoted), upper case on Snowflake (Airbyte's naming), any case on DuckDB. Quoting
    also keeps words like `user` and `timestamp` from being read as keywords. -#}
{% macro raw_col(name) -%}
  {%- if target.type == 'snowflake' -%}"{{ name | upper }}"{%- else -%}"{{ name }}"{%- endif -%}
{%- endmacro %}

{#- The UTC calendar date of a timestamp with time zone, whatever the session time zone. -#}
{% macro utc_date(column) -%}
  {{ return(adapter.dispatch('utc_date', 'stripe_platform')(column)) }}
{%- endmacro %}
{% macro default__utc_date(column) -%}
  cast(({{ column }} at time zone 'UTC') as date)
{%- endmacro %}
{% macro snowflake__utc_date(column) -%}
  cast(convert_timezone('UTC', {{ column }}) as date)
{%- endmacro %}

{#- The DIM_Date key of a date: YYYYMMDD as an integer, stable across rebuilds and targets. -#}
{% macro date_key(date_expr) -%}
  cast(extract(year from {{ date_expr }}) * 10000 + extract(month from {{ date_expr }}) * 100
       + extract(day from {{ date_expr }}) as integer)
{%- endmacro %}

{#- A text field of a JSON column (`path` is dot-separated), NULL when absent. -#}
{% macro json_text(column, path) -%}
  {{ return(adapter.dispatch('json_text', 'stripe_platform')(column, path)) }}
{%- endmacro %}
{% macro default__json_text(column, path) -%}
  json_extract_string({{ column }}, '$.{{ path }}')
{%- endmacro %}
{% macro postgres__json_text(column, path) -%}
  ({{ column }} #>> '{ {{- path.split('.') | join(',') -}} }')
{%- endmacro %}
{% macro snowflake__json_text(column, path) -%}
  cast(get_path({{ column }}, '{{ path }}') as varchar)
{%- endmacro %}

{#- The number of elements of a JSON array column. -#}
{% macro json_array_size(column) -%}
  {{ return(adapter.dispatch('json_array_size', 'stripe_platform')(column)) }}
{%- endmacro %}
{% macro default__json_array_size(column) -%}
  json_array_length({{ column }})
{%- endmacro %}
{% macro postgres__json_array_size(column) -%}
  jsonb_array_length({{ column }})
{%- endmacro %}
{% macro snowflake__json_array_size(column) -%}
  array_size({{ column }})
{%- endmacro %}

{#- Day of week, 0 = Sunday ... 6 = Saturday, on every target. -#}
{% macro day_of_week(date_expr) -%}
  {{ return(adapter.dispatch('day_of_week', 'stripe_platform')(date_expr)) }}
{%- endmacro %}
{% macro default__day_of_week(date_expr) -%}
  cast(extract(dow from {{ date_expr }}) as integer)
{%- endmacro %}
{% macro snowflake__day_of_week(date_expr) -%}
  {#- DAYOFWEEK depends on the session's WEEK_START; counting from a known Sunday does not. -#}
  cast(mod(datediff('day', cast('1900-01-07' as date), {{ date_expr }}), 7) as integer)
{%- endmacro %}
