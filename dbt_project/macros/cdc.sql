{#- The current state of a CDC stream: the latest version of each primary key, and nothing that was
    deleted at the source. Raw tables of deduped streams already hold one row per key when the
    embedded engine or Airbyte typed/deduped them, but a raw table can also receive re-deliveries
    (append streams, a crash between load and dedupe), so staging never relies on it. -#}
{% macro latest_cdc_rows(relation, primary_key, order_by) -%}
select * from (
    select
        src.*,
        row_number() over (
            partition by {{ primary_key | join(', ') }}
            order by {{ order_by }} desc nulls last, _airbyte_extracted_at desc
        ) as _stripe_platform_version_rank
    from {{ relation }} as src
) as versions
where _stripe_platform_version_rank = 1
  and _ab_cdc_deleted_at is null
{%- endmacro %}
