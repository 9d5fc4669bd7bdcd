{#- Custom schemas are used as written (staging, intermediate, reference, snapshots) instead of
    dbt's default "<target schema>_<custom>", so the names are the same on every target. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
  {%- if custom_schema_name is none -%}{{ target.schema }}{%- else -%}{{ custom_schema_name | trim }}{%- endif -%}
{%- endmacro %}
