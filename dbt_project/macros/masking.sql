{#- Warehouse masking (issue 20): every mart column the catalog classifies RESTRICTED (the
    `classification` meta of models/marts/*.yml; var `restricted_classes`, the same set as
    governance.classification.RESTRICTED) is hidden from every role the access policy does not
    let read it in clear. One mechanism for
    the three targets, wired in dbt_project.yml: `on-run-start` prepares what is shared (the masked
    schema and its grants; Snowflake's policies), a post-hook of every mart masks that mart.

    Which roles see what comes from the access policy (access/policy.yaml, issue 21), never from
    here: `stripe-platform` computes it (security/access_warehouse.masking_env) and hands it to every
    dbt run in the environment variable STRIPE_PLATFORM_DBT_MASKING (transform/dbt.dbt_env): the
    roles listing the warehouse schema `marts` with the classes each may read in clear, and the
    roles listing `marts_masked`. The marts' clear roles are those that may read in clear every
    restricted class the marts hold (masking_roles()).

    - Snowflake: one masking policy per data type (MASK_VARCHAR, MASK_NUMBER...), attached to each
      restricted column with ALTER TABLE ... MODIFY COLUMN ... SET MASKING POLICY ... FORCE. Sessions
      holding a clear role (IS_ROLE_IN_SESSION) see the value, every other role '***MASKED***'
      (strings) or NULL. The post-hook then grants SELECT on the mart to the clear and masked roles
      (after the policies are attached: no future grants on the marts' schema, which would let a
      rebuilt mart be read before its masking).
    - PostgreSQL: the base marts (schema analytics) are readable by the clear roles only; schema
      marts_masked holds one view per mart, same name and columns, restricted columns replaced by
      '***MASKED***' or NULL, readable by the roles listing marts_masked. A view runs with its
      owner's rights, so readers need no grant on the base tables. `access apply` adds the default
      privileges, the raw schema and the login roles (security/access_warehouse.py).
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

{#- The post-hook of every mart (dbt_project.yml): masks it, then grants it to its readers where
    that is not done otherwise (Snowflake). Runs its statements and renders nothing. -#}
{% macro apply_masking() -%}
  {%- if execute -%}
    {%- do run_masking(masking_statements(this, model)) -%}
    {%- do run_masking(reader_grant_statements(this)) -%}
  {%- endif -%}
{%- endmacro %}

{#- The grants of a mart once masked. PostgreSQL grants in masking_statements (base and view
    differ), DuckDB has no roles. -#}
{% macro reader_grant_statements(relation) -%}
  {{ return(adapter.dispatch('reader_grant_statements', 'stripe_platform')(relation)) }}
{%- endmacro %}

{% macro default__reader_grant_statements(relation) -%}
  {{ return([]) }}
{%- endmacro %}

{#- Snowflake: a mart rebuilt by `create or replace` has lost its grants; the roles reading the
    marts (in clear or masked: the masking policies decide what each sees) get it back, those the
    account has (`access apply` creates them). fakesnow has no SHOW ROLES: under its shims nothing
    is run (snowflake__run_masking), so nothing is asked. -#}
{% macro snowflake__reader_grant_statements(relation) -%}
  {%- if fakesnow_shims() -%}{{ return([]) }}{%- endif -%}
  {%- set roles = masking_roles() -%}
  {%- set wanted = [] -%}
  {%- for role in roles['clear'] + roles['masked'] if role | upper not in wanted -%}
    {%- do wanted.append(role | upper) -%}
  {%- endfor -%}
  {%- set existing = [] -%}
  {%- if wanted -%}
    {%- for row in run_query('show roles') -%}{%- do existing.append(row['name'] | upper) -%}{%- endfor -%}
  {%- endif -%}
  {%- set statements = [] -%}
  {%- for role in wanted if role in existing -%}
    {%- do statements.append('GRANT SELECT ON TABLE ' ~ relation ~ ' TO ROLE ' ~ role) -%}
  {%- endfor -%}
  {{ return(statements) }}
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

{#- The classification of a mart column (its `classification` meta); an unknown one fails. -#}
{% macro column_class(node, column) -%}
  {%- set known = var('restricted_classes') + ['non_personal'] -%}
  {%- set config_meta = (column.get('config') or {}).get('meta') or {} -%}
  {%- set value = config_meta.get('classification', (column.get('meta') or {}).get('classification')) -%}
  {%- set value = (value or '') | string | lower -%}
  {%- if value not in known -%}
    {{ exceptions.raise_compiler_error(
        'masking: ' ~ node.name ~ '.' ~ column.name ~ ' has classification "' ~ value
        ~ '"; expected one of ' ~ known | join(', ') ~ ' (models/marts YAML, config.meta)') }}
  {%- endif -%}
  {{ return(value) }}
{%- endmacro %}

{#- [(column name, data_type, restricted?)] of a mart, in its contract's order. -#}
{% macro classified_columns(node) -%}
  {%- set restricted = var('restricted_classes') -%}
  {%- set columns = [] -%}
  {%- for column in node.columns.values() -%}
    {%- set value = column_class(node, column) -%}
    {%- if not column.get('data_type') -%}
      {{ exceptions.raise_compiler_error('masking: ' ~ node.name ~ '.' ~ column.name ~ ' has no data_type') }}
    {%- endif -%}
    {%- do columns.append((column.name, column.data_type | lower, value in restricted)) -%}
  {%- endfor -%}
  {{ return(columns) }}
{%- endmacro %}

{#- The roles of the access policy, as `stripe-platform` passes them (transform/dbt.dbt_env):
    {"marts": {role listing the schema marts: [classes it may read in clear]}, "masked": [roles
    listing marts_masked]}. Returns {"clear": [roles reading the marts in clear: those that may read
    in clear every restricted class some mart holds], "masked": [...]}. Without the variable (dbt
    run by hand) the build fails: no grant is guessed. -#}
{% macro masking_roles() -%}
  {%- set text = env_var('STRIPE_PLATFORM_DBT_MASKING', '') -%}
  {%- if not text -%}
    {{ exceptions.raise_compiler_error(
        'masking: STRIPE_PLATFORM_DBT_MASKING is not set: the roles that read the marts come from '
        ~ 'the access policy; run dbt through `stripe-platform transform`') }}
  {%- endif -%}
  {%- set access = fromjson(text) -%}
  {%- set held = [] -%}
  {%- for node in graph.nodes.values() if node.resource_type == 'model' and node.original_file_path.startswith('models/marts/') -%}
    {%- for column in node.columns.values() -%}
      {%- set value = column_class(node, column) -%}
      {%- if value in var('restricted_classes') and value not in held -%}{%- do held.append(value) -%}{%- endif -%}
    {%- endfor -%}
  {%- endfor -%}
  {%- set clear = [] -%}
  {%- for role, classes in access['marts'].items() | sort -%}
    {%- if held | reject('in', classes) | list | length == 0 -%}{%- do clear.append(role) -%}{%- endif -%}
  {%- endfor -%}
  {{ return({'clear': clear, 'masked': access['masked'] | sort}) }}
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

{#- The roles of `wanted` that exist on this server: on a cluster without them (the access policy
    not applied yet) nothing is granted (deny by default). -#}
{% macro postgres__existing_roles(wanted) -%}
  {%- if not execute or not wanted -%}{{ return(wanted) }}{%- endif -%}
  {%- set quoted = [] -%}
  {%- for role in wanted -%}{%- do quoted.append("'" ~ role | lower ~ "'") -%}{%- endfor -%}
  {%- set rows = run_query('select rolname from pg_roles where rolname in (' ~ quoted | join(', ') ~ ') order by rolname') -%}
  {{ return(rows.columns[0].values() | list) }}
{%- endmacro %}

{#- (clear roles, marts_masked roles, marts_masked roles that must not read the base marts), of
    those that exist. -#}
{% macro postgres__masking_grantees() -%}
  {%- set roles = masking_roles() -%}
  {%- set clear = postgres__existing_roles(roles['clear']) -%}
  {%- set masked = postgres__existing_roles(roles['masked']) -%}
  {{ return((clear, masked, masked | reject('in', clear) | list)) }}
{%- endmacro %}

{% macro postgres__masking_setup_statements() -%}
  {%- set masked_schema = var('masked_schema') -%}
  {%- set clear, masked, masked_only = postgres__masking_grantees() -%}
  {%- set statements = ['create schema if not exists ' ~ masked_schema,
                        'revoke all on schema ' ~ target.schema ~ ', ' ~ masked_schema ~ ' from public'] -%}
  {%- if clear -%}
    {%- do statements.append('grant usage on schema ' ~ target.schema ~ ' to ' ~ clear | join(', ')) -%}
  {%- endif -%}
  {%- if masked -%}
    {%- do statements.append('grant usage on schema ' ~ masked_schema ~ ' to ' ~ masked | join(', ')) -%}
  {%- endif -%}
  {%- if masked_only -%}
    {#- A masked reader granted the base schema earlier by hand loses it. -#}
    {%- do statements.append('revoke all on schema ' ~ target.schema ~ ' from ' ~ masked_only | join(', ')) -%}
  {%- endif -%}
  {{ return(statements) }}
{%- endmacro %}

{% macro postgres__masking_statements(relation, node) -%}
  {%- set view = var('masked_schema') ~ '.' ~ relation.identifier -%}
  {%- set clear, masked, masked_only = postgres__masking_grantees() -%}
  {%- set statements = ['revoke all on ' ~ relation ~ ' from public'] -%}
  {%- if masked_only -%}
    {%- do statements.append('revoke all on ' ~ relation ~ ' from ' ~ masked_only | join(', ')) -%}
  {%- endif -%}
  {%- if clear -%}
    {%- do statements.append('grant select on ' ~ relation ~ ' to ' ~ clear | join(', ')) -%}
  {%- endif -%}
  {%- do statements.append('drop view if exists ' ~ view) -%}
  {%- do statements.append(masked_view_sql(relation, node)) -%}
  {%- if masked -%}
    {%- do statements.append('grant select on ' ~ view ~ ' to ' ~ masked | join(', ')) -%}
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

{#- Who sees a masked column in clear: any clear role in the session (IS_ROLE_IN_SESSION follows
    the role hierarchy); FALSE when the policy names none. -#}
{% macro snowflake_clear_condition() -%}
  {%- set tests = [] -%}
  {%- for role in masking_roles()['clear'] -%}
    {%- do tests.append("IS_ROLE_IN_SESSION('" ~ role | upper ~ "')") -%}
  {%- endfor -%}
  {{ return(tests | join(' OR ') if tests else 'FALSE') }}
{%- endmacro %}

{% macro snowflake__masking_setup_statements() -%}
  {%- set condition = snowflake_clear_condition() -%}
  {%- set statements = [] -%}
  {#- The same types as security/access_warehouse.SNOWFLAKE_MASKING_TYPES (`access snowflake-sql`). -#}
  {%- for policy_type in ('VARCHAR', 'NUMBER', 'FLOAT', 'DATE', 'TIMESTAMP_NTZ', 'TIMESTAMP_TZ', 'BOOLEAN') -%}
    {%- set masked = "'***MASKED***'" if policy_type == 'VARCHAR' else 'NULL' -%}
    {%- set body = "CASE WHEN " ~ condition ~ " THEN val ELSE " ~ masked ~ " END" -%}
    {%- set name = snowflake_policy_name(policy_type) -%}
    {%- do statements.append('CREATE MASKING POLICY IF NOT EXISTS ' ~ name ~ ' AS (val ' ~ policy_type
                             ~ ') RETURNS ' ~ policy_type ~ ' -> ' ~ body) -%}
    {#- An existing policy keeps its name and columns and takes the current body (the clear roles). -#}
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
