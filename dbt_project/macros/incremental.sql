{#- The DateKeys an incremental aggregate fact must recompute: the days of every payment that
    arrived (or whose fraud label arrived) after the fact's watermark, and of every payment deleted
    at the source since then. The facts replace those days whole: a pre-hook deletes them (so a day
    left with no rows is emptied too) and delete+insert on DateKey writes them again, so a payment
    that changed status, moved out of a group or disappeared leaves nothing stale behind.
    Models calling this declare `-- depends_on: {{ source('postgres', 'transaction') }}`. -#}
{% macro changed_date_keys(watermark_column='LastExtractedAt') -%}
    select date_key from {{ ref('int_transactions') }}
    where extracted_at > {{ watermark(watermark_column) }}
    union
    select {{ date_key(utc_date('datetime')) }} from {{ source('postgres', 'transaction') }}
    where _ab_cdc_deleted_at is not null
      and _airbyte_extracted_at > {{ watermark(watermark_column) }}
{%- endmacro %}

{#- How far an incremental model has got: the latest arrival it holds. A model its own pre-hook
    (or a post-hook) emptied has no watermark: the epoch then makes the run recompute everything,
    where a NULL would compare false and silently insert nothing. -#}
{% macro watermark(column) -%}
    coalesce((select max({{ column }}) from {{ this }}), cast('1970-01-01' as {{ dbt.type_timestamp() }}))
{%- endmacro %}
