{#- The DateKeys an incremental aggregate fact must recompute: the days of every payment that
    arrived (or whose fraud label arrived) after the fact's watermark, and of every payment deleted
    at the source since then. The facts replace those days whole: a pre-hook deletes them (so a day
    left with no rows is emptied too) and delete+insert on DateKey writes them again, so a payment
    that changed status, moved out of a group or disappeared leaves nothing stale behind.
    Models calling this declare `-- depends_on: {{ source('postgres', 'transaction') }}`. -#}
{% macro changed_date_keys(watermark_column='LastExtractedAt') -%}
    select date_key from {{ ref('int_transactions') }}
    where extracted_at > (select max({{ watermark_column }}) from {{ this }})
    union
    select {{ date_key(utc_date('datetime')) }} from {{ source('postgres', 'transaction') }}
    where _ab_cdc_deleted_at is not null
      and _airbyte_extracted_at > (select max({{ watermark_column }}) from {{ this }})
{%- endmacro %}
