{#- Test-only overrides for fakesnow, the Snowflake emulator CI runs dbt against (ARCHITECTURE §5).
    Each one is active only when the test suite sets STRIPE_PLATFORM_DBT_FAKESNOW_SHIMS=1; otherwise
    it calls dbt-snowflake's own macro unchanged, so a real Snowflake account never sees them.
    fakesnow answers SQL it cannot handle with HTTP 500, which the connector retries forever: a
    missing shim shows up as a hung build (the tests run dbt under a timeout). -#}

{% macro fakesnow_shims() -%}
  {{ return(target.type == 'snowflake' and env_var('STRIPE_PLATFORM_DBT_FAKESNOW_SHIMS', '') == '1') }}
{%- endmacro %}

{#- persist_docs: fakesnow cannot parse `alter table ... alter "COL" COMMENT $$...$$` (column
    comments), and a $$-quoted table comment containing a single quote crashes it (HTTP 500). The
    descriptions are documentation only; fakesnow skips them. -#}
{% macro snowflake__persist_docs(relation, model, for_relation, for_columns) -%}
  {%- if fakesnow_shims() -%}
    {{ return('') }}
  {%- endif -%}
  {{ return(dbt.snowflake__persist_docs(relation, model, for_relation, for_columns)) }}
{%- endmacro %}

{#- Session-temporary tables (the delete+insert staging table of incremental models, the staging
    table of snapshots): fakesnow maps them to DuckDB temporary tables, which may only live in
    DuckDB's "temp" catalog, not in STRIPE.ANALYTICS. A transient table is created instead
    (dbt drops an incremental model's tmp relation afterwards; a snapshot's is replaced next run). -#}
{% macro snowflake__create_table_temporary_sql(relation, compiled_code) -%}
  {%- if fakesnow_shims() -%}
    {{ return(dbt.snowflake__create_table_transient_sql(relation, compiled_code)) }}
  {%- endif -%}
  {{ return(dbt.snowflake__create_table_temporary_sql(relation, compiled_code)) }}
{%- endmacro %}

{#- The merge strategy stages an incremental model's new rows in a temporary view by default; the
    same DuckDB restriction applies to temporary views, so fakesnow gets a transient table. -#}
{% macro dbt_snowflake_get_tmp_relation_type(strategy, unique_key, language) -%}
  {%- set relation_type = dbt.dbt_snowflake_get_tmp_relation_type(strategy, unique_key, language) | trim -%}
  {%- if fakesnow_shims() and relation_type in ('view', 'table') -%}
    {{ return('transient') }}
  {%- endif -%}
  {{ return(relation_type) }}
{%- endmacro %}

{#- MERGE ... WHEN NOT MATCHED THEN INSERT (cols) VALUES (cols): Snowflake resolves the VALUES
    columns against the source; fakesnow hands the statement to DuckDB, which finds each name in
    both the target and the source and fails with "Ambiguous reference to column name". The shim
    qualifies the VALUES list with the source alias (what the statement means on Snowflake too).
    It also leaves out dbt-snowflake's explicit BEGIN ... COMMIT around the MERGE: fakesnow
    emulates MERGE with writes to its own bookkeeping database, and DuckDB refuses a transaction
    that writes to two attached databases ("a single transaction can only write to a single
    attached database"); the aborted transaction then fails every later statement of the session
    with HTTP 500. A single MERGE statement is atomic on its own. -#}
{% macro fakesnow_qualify_merge_values(dml) -%}
  {%- set match = modules.re.search('(?is)\\bvalues\\s*\\(([^()]*)\\)\\s*$', dml) -%}
  {%- if match is none -%}
    {{ exceptions.raise_compiler_error('fakesnow shim: no trailing VALUES list in the MERGE') }}
  {%- endif -%}
  {%- set qualified = [] -%}
  {%- for column in match.group(1).split(',') -%}
    {%- do qualified.append('DBT_INTERNAL_SOURCE.' ~ column | trim) -%}
  {%- endfor -%}
  {{ return(dml[:match.start()] ~ 'values (' ~ qualified | join(', ') ~ ')') }}
{%- endmacro %}

{% macro snowflake__get_merge_sql(target, source_sql, unique_key, dest_columns, incremental_predicates) -%}
  {%- if fakesnow_shims() and unique_key is not none -%}
    {%- set dml = dbt.default__get_merge_sql(target, source_sql, unique_key, dest_columns, incremental_predicates) -%}
    {{ return(fakesnow_qualify_merge_values(dml)) }}
  {%- endif -%}
  {{ return(dbt.snowflake__get_merge_sql(target, source_sql, unique_key, dest_columns, incremental_predicates)) }}
{%- endmacro %}

{% macro snowflake__snapshot_merge_sql(target, source, insert_cols) -%}
  {%- if fakesnow_shims() -%}
    {%- set dml = dbt.default__snapshot_merge_sql(target, source, insert_cols) -%}
    {{ return(fakesnow_qualify_merge_values(dml)) }}
  {%- endif -%}
  {{ return(dbt.snowflake__snapshot_merge_sql(target, source, insert_cols)) }}
{%- endmacro %}
