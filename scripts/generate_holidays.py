"""Regenerates dbt_project/seeds/holidays.csv: national public holidays of the countries the
platform's locations use, for the years DIM_Date covers (dbt_project.yml vars date_spine_*).

The `holidays` package is only needed to regenerate the file, so it is not a dependency:
    uvx --from holidays python scripts/generate_holidays.py
"""

import csv
from pathlib import Path

import holidays

COUNTRIES = ["AU", "BE", "BR", "CA", "CH", "DE", "ES", "FR", "GB", "IT", "JP", "NL", "US"]
YEARS = range(2020, 2031)
OUT = Path(__file__).resolve().parents[1] / "dbt_project" / "seeds" / "holidays.csv"

rows = []
for country in COUNTRIES:
    for day, name in sorted(holidays.country_holidays(country, years=YEARS).items()):
        rows.append((day.isoformat(), country, name))
rows.sort()
with OUT.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["holiday_date", "country_code", "holiday_name"])
    writer.writerows(rows)
print(f"{len(rows)} holidays written to {OUT}")
