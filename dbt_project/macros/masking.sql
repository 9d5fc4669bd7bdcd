{#- Warehouse masking (issue 20): every mart column the catalog classifies RESTRICTED (the
    `classification` meta of models/marts/*.yml; var `restricted_classes`, the same set as
    governance.classification.RESTRICTED) is hidden from every role below admin. One mechanism for
    the three targets, wired in dbt_project.yml: `on-run-start` prepares what is shared (the masked
    schema and its grants; Snowflake's policies), a post-hook of every mart masks that mart.

    - Snowflake: one masking policy per data type (MASK_VARCHAR, MASK_NUMBER...), attached to each
      restricted column with ALTER TABLE ... MODIFY COLUMN ... SET MASKING POLICY ... FORCE. Admin
      sessions (IS_ROLE_IN_SESSION(var masking_admin_role)) see the value, every other role
      '***MASKED***' (strings) or NULL.
    - PostgreSQL: the base marts (schema analytics) are readable by the admin role only; schema
      marts_masked holds one view per mart, same name and columns, restricted columns replaced by
      '***MASKED***' or NULL, readable by the reader roles (var masking_reader_roles). A view runs
      with its owner's rights, so readers need no grant on the base tables.
    - DuckDB (one file, one user, no roles): the same marts_masked views, for the analyst tools and
      the API to read. They hide nothing from whoever opens the file: the file's mode (0600) is the
      only access control there.

    A column without a classification, or with a value outside the known ones, fails the build:
    masking fails closed. -#}

{#- The statements that mask one mart (`node`: the model as the graph holds it; `relation`: its
    table), in execution order. run-operation print_masking_statements shows them. -#}
{% macro masking_statements(relation, node) -%}
  {{ return(adapter.dispatch('masking_statements', 'stripe_platform')(relation, node)) }}
{%- endmacro %}

{#- What on-run-start runs once per invocation: what several marts share (concurrent GRANTs on one
    schema fail in PostgreSQL with "tuple concurrently updated"). -#}
{% macro masking_setup_statements() -%}
  {{ return(adapter.dispatch('masking_setup_statements', 'stripe_platform')()) }}
{%- endmacro %}

{#- The post-hook of every mart (dbt_project.yml). Runs its statements and renders nothing. -#}
{% macro apply_masking() -%}
  {%- if execute -%}{%- do run_masking(masking_statements(this, model)) -%}{%- endif -%}
{%- endmacro %}

{#- on-run-start. -#}
{% macro prepare_masking() -%}
  {%- if execute -%}{%- do run_masking(masking_setup_statements()) -%}{%- endif -%}
{%- endmacro %}

{% macro run_masking(statements) -%}
  {{ return(adapter.dispatch('run_masking', 'stripe_platform')(statements)) }}
{%- endmacro %}

{% macro default__run_masking(statements) -%}
  {%- for statement in statements -%}{%- do run_query(statement) -%}{%- endfor -%}
{%- endmacro %}

{#- [(column name, data_type, restricted?)] of a mart, in its contract's order. -#}
{% macro classified_columns(node) -%}
  {%- set restricted = var('restricted_classes') -%}
  {%- set known = restricted + ['non_personal'] -%}
  {%- set columns = [] -%}
  {%- for column in node.columns.values() -%}
    {%- set config_meta = (column.get('config') or {}).get('meta') or {} -%}
    {%- set value = config_meta.get('classification', (column.get('meta') or {}).get('classification')) -%}
    {%- set value = (value or '') | string | lower -%}
    {%- if value not in known -%}
      {{ exceptions.raise_compiler_error(
          'masking: ' ~ node.name ~ '.' ~ column.name ~ ' has classification "' ~ value
          ~ '"; expected one of ' ~ known | join(', ') ~ ' (models/marts YAML, config.meta)') }}
    {%- endif -%}
    {%- if not column.get('data_type') -%}
      {{ exceptions.raise_compiler_error('masking: ' ~ node.name ~ '.' ~ column.name ~ ' has no data_type') }}
    {%- endif -%}
    {%- do columns.append((column.name, column.data_type | lower, value in restricted)) -%}
  {%- endfor -%}
  {{ return(columns) }}
{%- endmacro %}

{#- Masked value of a column of `data_type` (PostgreSQL and DuckDB views). -#}
{% macro masked_value(data_type) -%}
  {%- if data_type.split('(')[0] | trim in ('varchar', 'text', 'string', 'character varying') -%}
    cast('***MASKED***' as varchar)
  {%- else -%}
    cast(null as {{ data_type }})
  {%- endif -%}
{%- endmacro %}

{#- The masked view of a mart (PostgreSQL, DuckDB). -#}
{% macro masked_view_sql(relation, node) -%}
  {%- set view = var('masked_schema') ~ '.' ~ relation.identifier -%}
  {%- set select = [] -%}
  {%- for name, data_type, restricted in classified_columns(node) -%}
    {%- if restricted -%}
      {%- do select.append(masked_value(data_type) ~ ' as ' ~ name) -%}
    {%- else -%}
      {%- do select.append(name) -%}
    {%- endif -%}
  {%- endfor -%}
  {#- No database part: DuckDB names the catalog after the file, which may be opened under another name. -#}
  {{ return('create view ' ~ view ~ ' as select ' ~ select | join(', ') ~ ' from '
            ~ relation.include(database=false)) }}
{%- endmacro %}

{% macro default__masking_setup_statements() -%}
  {{ return(['create schema if not exists ' ~ var('masked_schema')]) }}
{%- endmacro %}

{% macro default__masking_statements(relation, node) -%}
  {%- set view = var('masked_schema') ~ '.' ~ relation.identifier -%}
  {{ return(['drop view if exists ' ~ view, masked_view_sql(relation, node)]) }}
{%- endmacro %}

{#- The roles of `wanted` that exist on this server: the brief's roles are cluster-wide, created
    by the OLTP migrations; a warehouse on a server without them grants nothing (deny by default). -#}
{% macro postgres__existing_roles(wanted) -%}
  {%- if not execute -%}{{ return(wanted) }}{%- endif -%}
  {%- set quoted = [] -%}
  {%- for role in wanted -%}{%- do quoted.append("'" ~ role | lower ~ "'") -%}{%- endfor -%}
  {%- set rows = run_query('select rolname from pg_roles where rolname in (' ~ quoted | join(', ') ~ ') order by rolname') -%}
  {{ return(rows.columns[0].values() | list) }}
{%- endmacro %}

{% macro postgres__masking_setup_statements() -%}
  {%- set masked = var('masked_schema') -%}
  {%- set statements = ['create schema if not exists ' ~ masked,
                        'revoke all on schema ' ~ target.schema ~ ', ' ~ masked ~ ' from public'] -%}
  {%- set admins = postgres__existing_roles([var('masking_admin_role')]) -%}
  {%- set readers = postgres__existing_roles(var('masking_reader_roles')) -%}
  {%- if admins -%}
    {%- do statements.append('grant usage on schema ' ~ target.schema ~ ', ' ~ masked ~ ' to ' ~ admins | join(', ')) -%}
  {%- endif -%}
  {%- if readers -%}
    {%- do statements.append('grant usage on schema ' ~ masked ~ ' to ' ~ readers | join(', ')) -%}
    {#- A reader role granted the base schema earlier by hand loses it. -#}
    {%- do statements.append('revoke all on schema ' ~ target.schema ~ ' from ' ~ readers | join(', ')) -%}
  {%- endif -%}
  {{ return(statements) }}
{%- endmacro %}

{% macro postgres__masking_statements(relation, node) -%}
  {%- set view = var('masked_schema') ~ '.' ~ relation.identifier -%}
  {%- set admins = postgres__existing_roles([var('masking_admin_role')]) -%}
  {%- set readers = postgres__existing_roles(var('masking_reader_roles')) -%}
  {%- set statements = ['revoke all on ' ~ relation ~ ' from public'] -%}
  {%- if readers -%}
    {%- do statements.append('revoke all on ' ~ relation ~ ' from ' ~ readers | join(', ')) -%}
  {%- endif -%}
  {%- if admins -%}
    {%- do statements.append('grant select on ' ~ relation ~ ' to ' ~ admins | join(', ')) -%}
  {%- endif -%}
  {%- do statements.append('drop view if exists ' ~ view) -%}
  {%- do statements.append(masked_view_sql(relation, node)) -%}
  {%- if admins + readers -%}
    {%- do statements.append('grant select on ' ~ view ~ ' to ' ~ (admins + readers) | join(', ')) -%}
  {%- endif -%}
  {{ return(statements) }}
{%- endmacro %}

{#- Snowflake: the policy of a column type, and its type in the policy's signature. -#}
{% macro snowflake_policy_type(data_type) -%}
  {%- set base = data_type.split('(')[0] | trim | lower -%}
  {%- if base in ('varchar', 'text', 'string', 'character varying', 'char') -%}{{ return('VARCHAR') }}
  {%- elif base in ('bigint', 'integer', 'int', 'smallint', 'numeric', 'decimal', 'number') -%}{{ return('NUMBER') }}
  {%- elif base in ('double', 'float', 'double precision', 'real') -%}{{ return('FLOAT') }}
  {%- elif base == 'date' -%}{{ return('DATE') }}
  {%- elif base in ('timestamp', 'timestamp_ntz') -%}{{ return('TIMESTAMP_NTZ') }}
  {%- elif base in ('timestamptz', 'timestamp_tz', 'timestamp with time zone') -%}{{ return('TIMESTAMP_TZ') }}
  {%- elif base == 'boolean' -%}{{ return('BOOLEAN') }}
  {%- endif -%}
  {{ exceptions.raise_compiler_error('masking: no Snowflake masking policy for data type ' ~ data_type) }}
{%- endmacro %}

{% macro snowflake_policy_name(policy_type) -%}
  {{ return(target.database ~ '.' ~ target.schema ~ '.MASK_' ~ policy_type) }}
{%- endmacro %}

{% macro snowflake__masking_setup_statements() -%}
  {%- set admin = var('masking_admin_role') | upper -%}
  {%- set statements = [] -%}
  {%- for policy_type in ('VARCHAR', 'NUMBER', 'FLOAT', 'DATE', 'TIMESTAMP_NTZ', 'TIMESTAMP_TZ', 'BOOLEAN') -%}
    {%- set masked = "'***MASKED***'" if policy_type == 'VARCHAR' else 'NULL' -%}
    {%- set body = "CASE WHEN IS_ROLE_IN_SESSION('" ~ admin ~ "') THEN val ELSE " ~ masked ~ " END" -%}
    {%- set name = snowflake_policy_name(policy_type) -%}
    {%- do statements.append('CREATE MASKING POLICY IF NOT EXISTS ' ~ name ~ ' AS (val ' ~ policy_type
                             ~ ') RETURNS ' ~ policy_type ~ ' -> ' ~ body) -%}
    {#- An existing policy keeps its name and columns and takes the current body (the admin role). -#}
    {%- do statements.append('ALTER MASKING POLICY ' ~ name ~ ' SET BODY -> ' ~ body) -%}
  {%- endfor -%}
  {{ return(statements) }}
{%- endmacro %}

{% macro snowflake__masking_statements(relation, node) -%}
  {%- set statements = [] -%}
  {%- for name, data_type, restricted in classified_columns(node) if restricted -%}
    {#- FORCE: an incremental mart keeps its table, and its columns their policy, between runs. -#}
    {%- do statements.append('ALTER TABLE ' ~ relation ~ ' MODIFY COLUMN ' ~ name | upper
                             ~ ' SET MASKING POLICY ' ~ snowflake_policy_name(snowflake_policy_type(data_type))
                             ~ ' FORCE') -%}
  {%- endfor -%}
  {{ return(statements) }}
{%- endmacro %}

{#- fakesnow (the test suite's Snowflake stand-in) parses neither masking policies nor ALTER TABLE
    ... MODIFY COLUMN: under its shims (macros/fakesnow.sql) the statements are rendered, not run.
    Real Snowflake runs them. -#}
{% macro snowflake__run_masking(statements) -%}
  {%- if not fakesnow_shims() -%}
    {%- for statement in statements -%}{%- do run_query(statement) -%}{%- endfor -%}
  {%- endif -%}
{%- endmacro %}

{#- `dbt run-operation print_masking_statements`: the statements of setup and of every mart, as
    one JSON object {"setup": [...], "<model>": [...]} on one log line (for review and tests). -#}
{% macro print_masking_statements() -%}
  {%- set plan = {'setup': masking_setup_statements()} -%}
  {%- for node in graph.nodes.values() if node.resource_type == 'model' and node.original_file_path.startswith('models/marts/') -%}
    {%- set relation = api.Relation.create(database=node.database, schema=node.schema, identifier=node.alias) -%}
    {%- do plan.update({node.name: masking_statements(relation, node)}) -%}
  {%- endfor -%}
  {%- do print('MASKING_PLAN ' ~ tojson(plan)) -%}
{%- endmacro %}
