"""Fixed reference data the generator draws from: countries, cities, industries, devices.

Ids of currencies, payment methods, statuses and industries are those inserted by
sql/oltp/0002_reference_data.sql.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Country:
    code: str
    name: str
    currency_id: (
        int  # 0002_reference_data.sql: 1 EUR, 2 USD, 3 GBP, 4 JPY, 5 CAD, 6 CHF, 7 AUD, 8 BRL
    )
    locale: str  # Faker locale for names and streets
    utc_offset: int  # hours, standard time; enough to find "odd hours" for a customer
    weight: float  # share of customers
    ip_prefix: str  # synthetic per-country address block
    cities: tuple[tuple[str, str, float, float], ...]  # (city, region, latitude, longitude)


COUNTRIES: tuple[Country, ...] = (
    Country(
        "FR",
        "France",
        1,
        "fr_FR",
        1,
        0.30,
        "81.",
        (
            ("Paris", "Île-de-France", 48.85661, 2.35222),
            ("Lille", "Hauts-de-France", 50.62925, 3.05726),
            ("Lyon", "Auvergne-Rhône-Alpes", 45.76404, 4.83566),
            ("Marseille", "Provence-Alpes-Côte d'Azur", 43.29648, 5.36978),
            ("Toulouse", "Occitanie", 43.60465, 1.44421),
            ("Bordeaux", "Nouvelle-Aquitaine", 44.83779, -0.57918),
            ("Nantes", "Pays de la Loire", 47.21837, -1.55362),
            ("Strasbourg", "Grand Est", 48.57340, 7.75211),
        ),
    ),
    Country(
        "DE",
        "Germany",
        1,
        "de_DE",
        1,
        0.12,
        "84.",
        (
            ("Berlin", "Berlin", 52.52001, 13.40495),
            ("Munich", "Bavaria", 48.13514, 11.58198),
            ("Hamburg", "Hamburg", 53.55109, 9.99368),
            ("Cologne", "North Rhine-Westphalia", 50.93753, 6.96028),
        ),
    ),
    Country(
        "GB",
        "United Kingdom",
        3,
        "en_GB",
        0,
        0.11,
        "86.",
        (
            ("London", "England", 51.50735, -0.12776),
            ("Manchester", "England", 53.48076, -2.24263),
            ("Edinburgh", "Scotland", 55.95325, -3.18827),
        ),
    ),
    Country(
        "US",
        "United States",
        2,
        "en_US",
        -5,
        0.14,
        "23.",
        (
            ("New York", "New York", 40.71278, -74.00597),
            ("San Francisco", "California", 37.77493, -122.41942),
            ("Chicago", "Illinois", 41.87811, -87.62980),
            ("Austin", "Texas", 30.26715, -97.74306),
        ),
    ),
    Country(
        "ES",
        "Spain",
        1,
        "es_ES",
        1,
        0.08,
        "88.",
        (
            ("Madrid", "Madrid", 40.41678, -3.70379),
            ("Barcelona", "Catalonia", 41.38506, 2.17340),
            ("Valencia", "Valencia", 39.46991, -0.37629),
        ),
    ),
    Country(
        "IT",
        "Italy",
        1,
        "it_IT",
        1,
        0.08,
        "93.",
        (("Rome", "Lazio", 41.90278, 12.49637), ("Milan", "Lombardy", 45.46427, 9.18951)),
    ),
    Country(
        "NL",
        "Netherlands",
        1,
        "nl_NL",
        1,
        0.04,
        "145.",
        (
            ("Amsterdam", "North Holland", 52.36757, 4.90414),
            ("Rotterdam", "South Holland", 51.92442, 4.47773),
        ),
    ),
    Country(
        "BE",
        "Belgium",
        1,
        "fr_BE",
        1,
        0.03,
        "91.",
        (("Brussels", "Brussels", 50.85034, 4.35171), ("Antwerp", "Flanders", 51.21945, 4.40246)),
    ),
    Country(
        "CA",
        "Canada",
        5,
        "en_CA",
        -5,
        0.03,
        "99.",
        (("Toronto", "Ontario", 43.65323, -79.38318), ("Montreal", "Quebec", 45.50169, -73.56726)),
    ),
    Country(
        "CH",
        "Switzerland",
        6,
        "de_CH",
        1,
        0.02,
        "178.",
        (("Zurich", "Zurich", 47.37689, 8.54169), ("Geneva", "Geneva", 46.20439, 6.14316)),
    ),
    Country("JP", "Japan", 4, "ja_JP", 9, 0.02, "126.", (("Tokyo", "Tokyo", 35.67620, 139.65031),)),
    Country(
        "AU",
        "Australia",
        7,
        "en_AU",
        10,
        0.02,
        "101.",
        (("Sydney", "New South Wales", -33.86882, 151.20929),),
    ),
    Country(
        "BR",
        "Brazil",
        8,
        "pt_BR",
        -3,
        0.03,
        "177.",
        (
            ("São Paulo", "São Paulo", -23.55052, -46.63331),
            ("Rio de Janeiro", "Rio de Janeiro", -22.90685, -43.17290),
        ),
    ),
)

# Amounts are generated in EUR and converted to the transaction currency with these fixed rates.
EUR_TO = {1: 1.0, 2: 1.08, 3: 0.86, 4: 162.0, 5: 1.47, 6: 0.95, 7: 1.65, 8: 5.4}

# (industry id, name, share of merchants, log-mean amount in EUR, MCC)
INDUSTRIES = (
    (1, "Retail", 0.30, 3.6, "5399"),
    (2, "Travel", 0.07, 5.4, "4511"),
    (3, "Food & Beverage", 0.16, 2.9, "5812"),
    (4, "Digital Services", 0.11, 2.7, "5817"),
    (5, "Entertainment", 0.08, 3.3, "7832"),
    (6, "Health", 0.06, 3.5, "5912"),
    (7, "Education", 0.04, 4.4, "8299"),
    (8, "Financial Services", 0.04, 4.6, "6012"),
    (9, "Gaming", 0.08, 2.8, "5816"),
    (10, "Utilities", 0.06, 4.2, "4900"),
)
CARD_TESTING_INDUSTRIES = (4, 9)  # small digital goods: where stolen cards are tried first
ATO_INDUSTRIES = (1, 4, 9)  # resellable goods and gift cards

# (size id, share of merchants, relative transaction volume)
SIZES = ((1, 0.65, 1.0), (2, 0.25, 6.0), (3, 0.10, 40.0))

# Payment methods (0002): 1 Credit Card, 2 Debit Card, 3 Bank Transfer, 4 Wallet, 5 BNPL, 6 SEPA DD
PAYMENT_METHOD_SHARE = np.array([0.38, 0.30, 0.08, 0.16, 0.04, 0.04])
CARD_METHODS = (1, 2)
CARD_BRANDS = ("Visa", "Mastercard", "American Express", "CB")

DEVICE_TYPES = ("Mobile", "Tablet", "Desktop")
DEVICE_TYPE_SHARE = np.array([0.58, 0.12, 0.30])
# (device type, os, os versions, browser, browser versions, share within type)
DEVICE_MODELS = (
    ("Mobile", "iOS", ("17.2", "17.5", "18.1"), "Safari", ("17.2", "17.5", "18.1"), 0.45),
    ("Mobile", "Android", ("13", "14", "15"), "Chrome", ("120.0", "124.0", "130.0"), 0.55),
    ("Tablet", "iPadOS", ("17.1", "17.5", "18.0"), "Safari", ("16.5", "17.5", "18.0"), 0.7),
    ("Tablet", "Android", ("13", "14"), "Chrome", ("120.0", "126.0"), 0.3),
    ("Desktop", "Windows", ("10", "11"), "Edge", ("119.0", "124.0", "130.0"), 0.45),
    ("Desktop", "Windows", ("10", "11"), "Chrome", ("120.0", "126.0", "130.0"), 0.2),
    ("Desktop", "macOS", ("13.6", "14.1", "15.0"), "Safari", ("17.1", "18.0"), 0.25),
    ("Desktop", "Linux", ("6.1", "6.5"), "Firefox", ("121.0", "128.0"), 0.1),
)

# Seasonality: relative volume per calendar month (Jan..Dec), weekday (Mon..Sun) and UTC-local hour.
MONTH_WEIGHT = np.array([0.86, 0.84, 0.95, 0.97, 1.0, 1.02, 1.08, 1.05, 0.97, 1.0, 1.22, 1.42])
WEEKDAY_WEIGHT = np.array([0.92, 0.94, 0.96, 1.0, 1.12, 1.16, 0.90])
HOUR_WEIGHT = np.array(
    [
        0.25,
        0.14,
        0.08,
        0.06,
        0.06,
        0.10,
        0.28,
        0.55,
        0.80,
        0.95,
        1.05,
        1.15,
        1.35,
        1.30,
        1.10,
        1.00,
        1.02,
        1.12,
        1.30,
        1.42,
        1.38,
        1.15,
        0.80,
        0.45,
    ]
)
ANNUAL_GROWTH = 0.30


def locations() -> list[tuple[int, str, str, str, str, float, float]]:
    """Rows of the Location table: (id, city, region, country, code, latitude, longitude)."""
    rows, next_id = [], 1
    for country in COUNTRIES:
        for city, region, lat, lon in country.cities:
            rows.append((next_id, city, region, country.name, country.code, lat, lon))
            next_id += 1
    return rows
