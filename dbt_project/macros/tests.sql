{#- No dbt packages can be installed (the package hub is unreachable), so the one generic test the
    built-ins lack is here: several columns that must be unique together. -#}
{% test unique_combination(model, columns) %}
select {{ columns | join(', ') }}, count(*) as occurrences
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}
