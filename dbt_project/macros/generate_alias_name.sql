{#- Relations are named in lower case on PostgreSQL and DuckDB (Snowflake folds them to upper case
    itself). The brief's names (FACT_Revenue...) stay the model names and still resolve, unquoted,
    on every target; but dbt looks mixed-case relations up verbatim in PostgreSQL's catalog, where
    an unquoted FACT_Revenue is stored as fact_revenue, and would not find its own tables. -#}
{% macro generate_alias_name(custom_alias_name=none, node=none) -%}
  {%- set name = (custom_alias_name or node.name) | trim -%}
  {%- if target.type == 'snowflake' -%}{{ name }}{%- else -%}{{ name | lower }}{%- endif -%}
{%- endmacro %}
