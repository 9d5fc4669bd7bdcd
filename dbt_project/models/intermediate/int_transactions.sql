-- One row per payment with everything the facts share: its current status, its UTC date, the
-- fraud label of its scored document, the fraud model's newest score and decision (FraudScore),
-- the stream scorer's latest score of it and how long its first one took (FraudScoreEvent),
-- whether fraud was reported (confirmed), the consumption-tax rate of the country it happened in,
-- and its amount in the reporting currency (EUR). `extracted_at` is the latest arrival of any of
-- its inputs: the incremental facts use it as their watermark.
-- Incremental: a run recomputes only the payments whose OLTP row, scored document, model scores or
-- status changes arrived after the table's watermark (a pre-hook removes those deleted at the
-- source), so its cost follows the size of the change, not of the history. Reference data (statuses, currencies, locations, the
-- rate seeds) is joined as it is at that moment: a change to it reaches older payments on the next
-- `--full-refresh`.
-- depends_on: {{ source('postgres', 'transaction') }}
-- depends_on: {{ source('mongodb', 'transaction') }}
-- depends_on: {{ source('postgres', 'fraudscore') }}
-- depends_on: {{ source('postgres', 'fraudscoreevent') }}
-- depends_on: {{ source('postgres', 'transactionstatechanges') }}
{{
    config(
        materialized='incremental',
        unique_key='transaction_id',
        incremental_strategy='delete+insert',
        on_schema_change='fail',
        pre_hook="{% if is_incremental() %}delete from {{ this }} where transaction_id in (select id from {{ source('postgres', 'transaction') }} where _ab_cdc_deleted_at is not null and _airbyte_extracted_at > {{ watermark('extracted_at') }}){% endif %}"
    )
}}

with
{% if is_incremental() %}
changed as (
    select id as transaction_id from {{ source('postgres', 'transaction') }}
    where _airbyte_extracted_at > {{ watermark('extracted_at') }}
    union
    select cast({{ raw_col('transaction_id') }} as {{ dbt.type_bigint() }})
    from {{ source('mongodb', 'transaction') }}
    where _airbyte_extracted_at > {{ watermark('extracted_at') }}
    union
    select transactionid from {{ source('postgres', 'fraudscore') }}
    where _airbyte_extracted_at > {{ watermark('extracted_at') }}
    union
    select transactionid from {{ source('postgres', 'fraudscoreevent') }}
    where _airbyte_extracted_at > {{ watermark('extracted_at') }}
    union
    select transactionid from {{ source('postgres', 'transactionstatechanges') }}
    where _airbyte_extracted_at > {{ watermark('extracted_at') }}
),
{% endif %}

transactions as (
    select * from {{ ref('stg_postgres__transactions') }}
    {% if is_incremental() %}
    where transaction_id in (select transaction_id from changed)
    {% endif %}
),

statuses as (
    select * from {{ ref('stg_postgres__transaction_statuses') }}
),

currencies as (
    select * from {{ ref('stg_postgres__currencies') }}
),

rates as (
    select * from {{ ref('currency_rates') }}
),

locations as (
    select * from {{ ref('stg_postgres__locations') }}
),

tax_rates as (
    select * from {{ ref('country_tax_rates') }}
),

scored as (
    select * from {{ ref('stg_mongodb__transactions') }}
),

-- The newest champion's score of each payment: every champion version scores every payment once,
-- so a payment's latest scored row (then its highest version) is the most recent champion's, the
-- one scoring wrote into its document last.
model_scores as (
    select transaction_id, model_version, score, is_fraud from (
        select
            fs.*,
            row_number() over (
                partition by transaction_id order by scored_at desc, model_version desc
            ) as newest
        from {{ ref('stg_postgres__fraud_scores') }} as fs
        {% if is_incremental() %}
        where transaction_id in (select transaction_id from changed)
        {% endif %}
    ) as ranked
    where newest = 1
),

-- The stream's scores of each payment, one per change of it (WAL position, LSN): the latest change's
-- score and decision, and the commit-to-score delay of the first, the payment's own commit.
stream_events as (
    select
        transaction_id,
        score,
        is_fraud,
        commit_to_score_ms,
        row_number() over (partition by transaction_id order by lsn desc) as newest,
        row_number() over (partition by transaction_id order by lsn) as oldest
    from {{ ref('stg_postgres__fraud_score_events') }}
    {% if is_incremental() %}
    where transaction_id in (select transaction_id from changed)
    {% endif %}
),

stream_scores as (
    select latest.transaction_id, latest.score, latest.is_fraud, earliest.commit_to_score_ms
    from stream_events as latest
    inner join stream_events as earliest
        on latest.transaction_id = earliest.transaction_id and earliest.oldest = 1
    where latest.newest = 1
),

-- Confirmed fraud: a fraud report, i.e. a status change to disputed with a reason of the seed
-- fraud_dispute_reasons, whatever the dispute's outcome (the fraud model's label, ml/contract.py).
fraud_reports as (
    select distinct c.transaction_id
    from {{ ref('stg_postgres__transaction_state_changes') }} as c
    inner join statuses as s on c.to_status_id = s.status_id
    where s.status_name = 'disputed'
      and c.reason in (select reason from {{ ref('fraud_dispute_reasons') }})
      {% if is_incremental() %}
      and c.transaction_id in (select transaction_id from changed)
      {% endif %}
),

-- The latest arrival of a payment's scores and status changes, rows deleted at the source
-- included: a score removed there must still move the payment past the facts' watermarks.
related_arrivals as (
    select transaction_id, max(extracted_at) as extracted_at from (
        select transactionid as transaction_id, _airbyte_extracted_at as extracted_at
        from {{ source('postgres', 'fraudscore') }}
        union all
        select transactionid, _airbyte_extracted_at
        from {{ source('postgres', 'fraudscoreevent') }}
        union all
        select transactionid, _airbyte_extracted_at
        from {{ source('postgres', 'transactionstatechanges') }}
    ) as related
    {% if is_incremental() %}
    where transaction_id in (select transaction_id from changed)
    {% endif %}
    group by transaction_id
)

select
    t.transaction_id,
    t.transacted_at,
    t.transaction_date,
    {{ date_key('t.transaction_date') }} as date_key,
    t.customer_id,
    t.merchant_id,
    t.location_id,
    t.payment_method_id,
    t.currency_id,
    t.device_id,
    s.status_name,
    s.status_name = 'completed' as is_completed,
    s.status_name = 'charged_back' as is_charged_back,
    coalesce(scored.is_fraud, false) as is_fraud,
    scored.transaction_id is not null as has_scored_document,
    scored.anomaly_score,
    ms.transaction_id is not null as is_scored,
    ms.score as fraud_score,
    ms.model_version as fraud_model_version,
    coalesce(ms.is_fraud, false) as is_predicted_fraud,
    fr.transaction_id is not null as is_confirmed_fraud,
    ss.transaction_id is not null as is_stream_scored,
    ss.score as stream_score,
    coalesce(ss.is_fraud, false) as is_stream_flagged,
    ss.commit_to_score_ms as stream_commit_to_score_ms,
    t.amount as local_amount,
    c.currency_code,
    cast(t.amount * r.eur_per_unit as {{ dbt.type_numeric() }}) as amount_eur,
    coalesce(tax.tax_rate, 0) as tax_rate,
    cast(t.amount * r.eur_per_unit * coalesce(tax.tax_rate, 0) / (1 + coalesce(tax.tax_rate, 0))
         as {{ dbt.type_numeric() }}) as tax_amount_eur,
    l.country_code,
    t.updated_at,
    -- greatest() is NULL with a NULL argument on Snowflake: absent inputs count as the row's own.
    greatest(
        t.extracted_at,
        coalesce(scored.extracted_at, t.extracted_at),
        coalesce(arrivals.extracted_at, t.extracted_at)
    ) as extracted_at
from transactions as t
inner join statuses as s on t.status_id = s.status_id
inner join currencies as c on t.currency_id = c.currency_id
left join rates as r on c.currency_code = r.currency_code
left join locations as l on t.location_id = l.location_id
left join tax_rates as tax on l.country_code = tax.country_code
left join scored on t.transaction_id = scored.transaction_id
left join model_scores as ms on t.transaction_id = ms.transaction_id
left join fraud_reports as fr on t.transaction_id = fr.transaction_id
left join stream_scores as ss on t.transaction_id = ss.transaction_id
left join related_arrivals as arrivals on t.transaction_id = arrivals.transaction_id
