"""Vectorised generation of the OLTP entities, deterministic for a seed.

Everything is drawn from one numpy Generator (and Faker instances seeded from it), in a fixed order,
so the same SeedSpec always yields identical tables. Fraud patterns are in fraud.py, status life
cycles in lifecycle.py; this module wires them together.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from faker import Faker

from stripe_platform.seed import reference as ref
from stripe_platform.seed.spec import SeedSpec

MS_PER_DAY = 86_400_000
MS_PER_HOUR = 3_600_000


def to_ms(day: dt.date) -> int:
    return int(dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC).timestamp() * 1000)


def ts_array(ms: np.ndarray) -> pa.Array:
    return pa.array(ms.astype("int64"), pa.int64()).cast(pa.timestamp("ms", tz="UTC"))


@dataclass
class Population:
    """Who can transact: arrays indexed by customer / merchant position (ids are position + 1)."""

    customer_id: np.ndarray
    customer_country: np.ndarray  # index into ref.COUNTRIES
    customer_location: np.ndarray  # Location.ID of home city (= billing address city)
    customer_address: np.ndarray  # Address.ID
    customer_activity: np.ndarray  # relative transaction frequency
    customer_spend: np.ndarray  # amount multiplier
    customer_pref_method: np.ndarray
    customer_primary_device: np.ndarray
    customer_second_device: np.ndarray  # 0 = none
    customer_card: np.ndarray  # shape (n, 2): PaymentInstrument.ID for credit, debit (0 = none)
    customer_ip: np.ndarray  # home IP
    merchant_id: np.ndarray
    merchant_country: np.ndarray
    merchant_location: np.ndarray
    merchant_industry: np.ndarray
    merchant_size: np.ndarray
    merchant_weight: np.ndarray
    colluding_merchants: np.ndarray  # merchant positions
    location_country: np.ndarray  # per Location.ID - 1

    @property
    def locations_by_country(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.location_country == c) + 1 for c in range(len(ref.COUNTRIES))]


def country_ips(rng: np.random.Generator, countries: np.ndarray) -> np.ndarray:
    """Synthetic IPv4 addresses inside each country's block."""
    octets = rng.integers(1, 255, size=(len(countries), 3))
    prefixes = [ref.COUNTRIES[c].ip_prefix for c in countries]
    return np.array(
        [
            f"{p}{a}.{b}.{c}" if p.count(".") == 1 else f"{p}{a}.{b}"
            for p, (a, b, c) in zip(prefixes, octets, strict=True)
        ],
        dtype=object,
    )


def fingerprints(seed: int, kind: str, ids: np.ndarray) -> np.ndarray:
    return np.array(
        [hashlib.sha1(f"{seed}:{kind}:{i}".encode()).hexdigest() for i in ids],  # noqa: S324
        dtype=object,
    )


def luhn_pan(rng: np.random.Generator, n: int, brands: np.ndarray) -> np.ndarray:
    """Card numbers with valid check digits; prefixes match the brand."""
    prefix = {"Visa": "4", "Mastercard": "5", "American Express": "37", "CB": "4"}
    pans = []
    body_digits = rng.integers(0, 10, size=(n, 16))
    for brand, digits in zip(brands, body_digits, strict=True):
        length = 15 if brand == "American Express" else 16
        head = prefix[brand]
        body = head + "".join(map(str, digits[: length - 1 - len(head)]))
        total = 0
        for i, ch in enumerate(reversed(body)):
            d = int(ch)
            if i % 2 == 0:
                d = d * 2 - 9 if d * 2 > 9 else d * 2
            total += d
        pans.append(body + str((10 - total % 10) % 10))
    return np.array(pans, dtype=object)


@dataclass
class Entities:
    """Everything but transactions: the Population plus the rows to load."""

    population: Population
    locations: list[tuple]
    merchants: pa.Table
    customers: pa.Table
    addresses: pa.Table
    devices: pa.Table
    instruments: pa.Table


def _faker(locale: str, seed: int) -> Faker:
    fake = Faker(locale)
    fake.seed_instance(seed)
    return fake


POOL = 400  # distinct values per locale drawn from Faker, then combined: Faker is ~50 us a call


def person_details(
    rng: np.random.Generator, seed: int, countries: np.ndarray
) -> tuple[list, list, list, list]:
    """Locale-appropriate names, phones, streets and postcodes for customers of these countries."""
    n = len(countries)
    names, phones, streets, postcodes = ([""] * n for _ in range(4))
    for c, country in enumerate(ref.COUNTRIES):
        rows = np.flatnonzero(countries == c)
        if not len(rows):
            continue
        fake = _faker(country.locale, seed + c)
        first = [fake.first_name() for _ in range(POOL)]
        last = [fake.last_name() for _ in range(POOL)]
        street = [fake.street_name() for _ in range(POOL)]
        postcode = [fake.postcode() for _ in range(POOL)]
        phone = [fake.phone_number() for _ in range(POOL)]
        pick = rng.integers(0, POOL, size=(len(rows), 5))
        number = rng.integers(1, 200, len(rows))
        for r, (a, b, st, pc, ph), num in zip(rows, pick, number, strict=True):
            names[r] = f"{first[a]} {last[b]}"
            streets[r] = f"{num} {street[st]}"
            postcodes[r] = postcode[pc]
            phones[r] = phone[ph]
    return names, phones, streets, postcodes


def generate_entities(spec: SeedSpec, rng: np.random.Generator) -> Entities:
    locations = ref.locations()
    location_country = np.array(
        [next(i for i, c in enumerate(ref.COUNTRIES) if c.code == row[4]) for row in locations]
    )
    by_country = [np.flatnonzero(location_country == c) + 1 for c in range(len(ref.COUNTRIES))]
    start_ms = to_ms(spec.start)

    # Merchants ------------------------------------------------------------------------------
    nm = spec.n_merchants
    country_w = np.array([c.weight for c in ref.COUNTRIES])
    m_country = rng.choice(len(ref.COUNTRIES), nm, p=country_w / country_w.sum())
    industry_w = np.array([i[2] for i in ref.INDUSTRIES])
    m_industry_pos = rng.choice(len(ref.INDUSTRIES), nm, p=industry_w / industry_w.sum())
    size_w = np.array([s[1] for s in ref.SIZES])
    m_size_pos = rng.choice(len(ref.SIZES), nm, p=size_w)
    m_location = np.array([rng.choice(by_country[c]) for c in m_country])
    m_rating = np.clip(np.round(rng.normal(4.1, 0.45, nm), 1), 1.0, 5.0)
    m_weight = np.array([ref.SIZES[s][2] for s in m_size_pos]) * rng.lognormal(0, 0.5, nm)
    small = np.flatnonzero(m_size_pos == 0)
    colluding = rng.choice(small, max(1, round(0.005 * nm)), replace=False)
    company = _faker("en_US", spec.seed)
    m_names = np.array(
        [f"{company.company()} {ref.INDUSTRIES[i][1].split()[0]}" for i in m_industry_pos],
        dtype=object,
    )
    merchant_id = np.arange(1, nm + 1)
    m_created = start_ms - rng.integers(30, 5 * 365, nm) * MS_PER_DAY
    merchants = pa.table(
        {
            "id": merchant_id,
            "name": m_names,
            "industryid": np.array([ref.INDUSTRIES[i][0] for i in m_industry_pos]),
            "merchantsizeid": np.array([ref.SIZES[s][0] for s in m_size_pos]),
            "rating": m_rating,
            "merchantcategorycode": np.array(
                [ref.INDUSTRIES[i][4] for i in m_industry_pos], dtype=object
            ),
            "locationid": m_location,
            "createdat": ts_array(m_created),
            "updatedat": ts_array(m_created),
        }
    )

    # Customers ------------------------------------------------------------------------------
    nc = spec.n_customers
    c_country = rng.choice(len(ref.COUNTRIES), nc, p=country_w / country_w.sum())
    c_location = np.array([rng.choice(by_country[c]) for c in c_country])
    c_activity = rng.pareto(1.8, nc) + 0.2
    c_spend = rng.lognormal(0, 0.6, nc)
    c_device_type = rng.choice(3, nc, p=ref.DEVICE_TYPE_SHARE)
    c_pref_method = rng.choice(6, nc, p=ref.PAYMENT_METHOD_SHARE) + 1
    customer_id = np.arange(1, nc + 1)
    names, phones, streets, postcodes = person_details(rng, spec.seed, c_country)
    slug = [
        "".join(
            ch for ch in n.lower().replace(" ", ".") if ch.isascii() and (ch.isalnum() or ch == ".")
        )
        for n in names
    ]
    usernames = np.array(
        [f"{s.split('.')[0] or 'user'}{i}" for s, i in zip(slug, customer_id, strict=True)],
        dtype=object,
    )
    emails = np.array(
        [f"{s or 'user'}.{i}@example.com" for s, i in zip(slug, customer_id, strict=True)],
        dtype=object,
    )
    passwords = np.array(
        [f"pw-{spec.seed}-{i}-{rng.integers(1e9)}" for i in customer_id], dtype=object
    )
    c_created = start_ms - rng.integers(1, 3 * 365, nc) * MS_PER_DAY
    customers = pa.table(
        {
            "id": customer_id,
            "username": usernames,
            "password": passwords,
            "email": emails,
            "fullname": np.array(names, dtype=object),
            "phone": np.array(phones, dtype=object),
            "countrycode": np.array([ref.COUNTRIES[c].code for c in c_country], dtype=object),
            "preferreddevice": np.array([ref.DEVICE_TYPES[t] for t in c_device_type], dtype=object),
            "preferredpaymentmethodid": c_pref_method,
            "preferredcurrencyid": np.array([ref.COUNTRIES[c].currency_id for c in c_country]),
            "createdat": ts_array(c_created),
            "updatedat": ts_array(c_created),
        }
    )
    addresses = pa.table(
        {
            "id": customer_id,
            "customerid": customer_id,
            "line1": np.array(streets, dtype=object),
            "postalcode": np.array(postcodes, dtype=object),
            "locationid": c_location,
            "isbilling": np.ones(nc, dtype=bool),
            "createdat": ts_array(c_created),
            "updatedat": ts_array(c_created),
        }
    )

    # Devices: a primary of the preferred type for everyone, a second one for 30% ------------------
    has_second = rng.random(nc) < 0.30
    second_type = rng.choice(3, nc, p=ref.DEVICE_TYPE_SHARE)
    owner = np.concatenate([customer_id, customer_id[has_second]])
    dtype_idx = np.concatenate([c_device_type, second_type[has_second]])
    devices = device_rows(
        rng,
        spec.seed,
        np.arange(1, len(owner) + 1),
        owner,
        dtype_idx,
        np.concatenate([c_created, c_created[has_second]]),
    )
    primary = customer_id.copy()
    second = np.zeros(nc, dtype=np.int64)
    second[has_second] = nc + np.arange(1, has_second.sum() + 1)

    # Payment instruments: everyone has at least one card ----------------------------------------
    has_credit = rng.random(nc) < 0.75
    has_debit = ~has_credit | (rng.random(nc) < 0.45)
    inst_owner = np.concatenate([customer_id[has_credit], customer_id[has_debit]])
    inst_method = np.concatenate([np.full(has_credit.sum(), 1), np.full(has_debit.sum(), 2)])
    ni = len(inst_owner)
    brands = np.array(ref.CARD_BRANDS, dtype=object)[rng.choice(4, ni, p=[0.5, 0.35, 0.07, 0.08])]
    pans = luhn_pan(rng, ni, brands)
    inst_id = np.arange(1, ni + 1)
    card = np.zeros((nc, 2), dtype=np.int64)
    card[customer_id[has_credit] - 1, 0] = inst_id[: has_credit.sum()]
    card[customer_id[has_debit] - 1, 1] = inst_id[has_credit.sum() :]
    inst_created = c_created[inst_owner - 1]
    instruments = pa.table(
        {
            "id": inst_id,
            "customerid": inst_owner,
            "paymentmethodid": inst_method,
            "brand": brands,
            "last4": np.array([p[-4:] for p in pans], dtype=object),
            "pan": pans,
            "expirymonth": rng.integers(1, 13, ni),
            "expiryyear": rng.integers(spec.end.year, spec.end.year + 5, ni),
            "createdat": ts_array(inst_created),
            "updatedat": ts_array(inst_created),
        }
    )

    population = Population(
        customer_id=customer_id,
        customer_country=c_country,
        customer_location=c_location,
        customer_address=customer_id.copy(),
        customer_activity=c_activity,
        customer_spend=c_spend,
        customer_pref_method=c_pref_method,
        customer_primary_device=primary,
        customer_second_device=second,
        customer_card=card,
        customer_ip=country_ips(rng, c_country),
        merchant_id=merchant_id,
        merchant_country=m_country,
        merchant_location=m_location,
        merchant_industry=np.array([ref.INDUSTRIES[i][0] for i in m_industry_pos]),
        merchant_size=np.array([ref.SIZES[s][0] for s in m_size_pos]),
        merchant_weight=m_weight,
        colluding_merchants=colluding,
        location_country=location_country,
    )
    return Entities(population, locations, merchants, customers, addresses, devices, instruments)


def device_rows(
    rng: np.random.Generator,
    seed: int,
    ids: np.ndarray,
    owners: np.ndarray,
    type_idx: np.ndarray,
    first_seen_ms: np.ndarray,
) -> pa.Table:
    n = len(ids)
    os_, osv, browser, bv = (np.empty(n, dtype=object) for _ in range(4))
    for t, type_name in enumerate(ref.DEVICE_TYPES):
        models = [m for m in ref.DEVICE_MODELS if m[0] == type_name]
        share = np.array([m[5] for m in models])
        rows = np.flatnonzero(type_idx == t)
        pick = rng.choice(len(models), len(rows), p=share / share.sum())
        for k, model in enumerate(models):
            sel = rows[pick == k]
            os_[sel] = model[1]
            osv[sel] = np.array(model[2], dtype=object)[rng.integers(0, len(model[2]), len(sel))]
            browser[sel] = model[3]
            bv[sel] = np.array(model[4], dtype=object)[rng.integers(0, len(model[4]), len(sel))]
    return pa.table(
        {
            "id": ids,
            "customerid": owners,
            "devicetype": np.array([ref.DEVICE_TYPES[t] for t in type_idx], dtype=object),
            "os": os_,
            "osversion": osv,
            "browser": browser,
            "browserversion": bv,
            "fingerprint": fingerprints(seed, "device", ids),
            "firstseenat": ts_array(first_seen_ms),
            "updatedat": ts_array(first_seen_ms),
        }
    )


def sample_times(
    rng: np.random.Generator, n: int, start: dt.date, end: dt.date, utc_offset_hours: np.ndarray
) -> np.ndarray:
    """Epoch ms with growth, month, weekday and local time-of-day patterns, inside [start, end)."""
    days = (end - start).days
    dates = np.array([start + dt.timedelta(days=d) for d in range(days)])
    growth = (1 + ref.ANNUAL_GROWTH) ** (np.arange(days) / 365)
    month_w = ref.MONTH_WEIGHT[[d.month - 1 for d in dates]]
    weekday_w = ref.WEEKDAY_WEIGHT[[d.weekday() for d in dates]]
    w = growth * month_w * weekday_w
    day = rng.choice(days, n, p=w / w.sum())
    hour = rng.choice(24, n, p=ref.HOUR_WEIGHT / ref.HOUR_WEIGHT.sum())
    ms = (
        to_ms(start)
        + day * MS_PER_DAY
        + (hour - utc_offset_hours) * MS_PER_HOUR
        + rng.integers(0, MS_PER_HOUR, n)
    )
    return wrap_days(ms, start, end)


def wrap_days(ms: np.ndarray, start: dt.date, end: dt.date) -> np.ndarray:
    """Local-time shifts can push a moment over either edge: move it a day back inside."""
    ms = np.where(ms < to_ms(start), ms + MS_PER_DAY, ms)
    return np.where(ms >= to_ms(end), ms - MS_PER_DAY, ms)


def offsets(countries: np.ndarray) -> np.ndarray:
    return np.array([c.utc_offset for c in ref.COUNTRIES])[countries]


def convert(amount_eur: np.ndarray, currency_id: np.ndarray) -> np.ndarray:
    rate = np.array([ref.EUR_TO[i] for i in range(1, 9)])[currency_id - 1]
    value = amount_eur * rate
    return np.where(currency_id == 4, np.round(value), np.round(value, 2))


def currency_of(countries: np.ndarray) -> np.ndarray:
    return np.array([c.currency_id for c in ref.COUNTRIES])[countries]


def legit_transactions(
    rng: np.random.Generator,
    pop: Population,
    n: int,
    start: dt.date,
    end: dt.date,
    times_ms: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Ordinary customer behaviour. Returns columns keyed like the Transaction table."""
    nc = len(pop.customer_id)
    cust = rng.choice(nc, n, p=pop.customer_activity / pop.customer_activity.sum())
    country = pop.customer_country[cust]
    when = sample_times(rng, n, start, end, offsets(country)) if times_ms is None else times_ms

    # 85% domestic merchants, weighted by size; the rest anywhere.
    merchant = rng.choice(
        len(pop.merchant_id), n, p=pop.merchant_weight / pop.merchant_weight.sum()
    )
    domestic = rng.random(n) < 0.85
    for c in range(len(ref.COUNTRIES)):
        local = np.flatnonzero(pop.merchant_country == c)
        rows = np.flatnonzero(domestic & (country == c))
        if len(local) and len(rows):
            w = pop.merchant_weight[local]
            merchant[rows] = rng.choice(local, len(rows), p=w / w.sum())

    industry = pop.merchant_industry[merchant]
    mu = np.array([i[3] for i in ref.INDUSTRIES])[industry - 1]
    amount_eur = np.maximum(0.5, rng.lognormal(mu, 0.85) * np.sqrt(pop.customer_spend[cust]))

    method = np.where(
        rng.random(n) < 0.6,
        pop.customer_pref_method[cust],
        rng.choice(6, n, p=ref.PAYMENT_METHOD_SHARE) + 1,
    )
    instrument = np.zeros(n, dtype=np.int64)
    is_card = np.isin(method, ref.CARD_METHODS)
    wanted = pop.customer_card[cust, np.clip(method - 1, 0, 1)]
    other = pop.customer_card[cust, 1 - np.clip(method - 1, 0, 1)]
    instrument[is_card] = np.where(wanted > 0, wanted, other)[is_card]
    method = np.where(
        is_card & (wanted == 0), 3 - method, method
    )  # fall back to the card they hold

    second = pop.customer_second_device[cust]
    device = np.where(
        (rng.random(n) < 0.15) & (second > 0), second, pop.customer_primary_device[cust]
    )

    travelling = rng.random(n) < 0.08
    by_country = pop.locations_by_country
    location = pop.customer_location[cust].copy()
    mcountry = pop.merchant_country[merchant]
    for c in range(len(ref.COUNTRIES)):
        rows = np.flatnonzero(travelling & (mcountry == c))
        location[rows] = rng.choice(by_country[c], len(rows))
    ip = pop.customer_ip[cust].copy()
    away = (rng.random(n) < 0.15) | travelling
    ip[away] = country_ips(rng, pop.location_country[location[away] - 1])

    return transaction_columns(
        pop, cust, merchant, when, amount_eur, method, instrument, device, location, ip, None
    )


def transaction_columns(
    pop: Population,
    cust: np.ndarray,
    merchant: np.ndarray,
    when: np.ndarray,
    amount_eur: np.ndarray,
    method: np.ndarray,
    instrument: np.ndarray,
    device: np.ndarray,
    location: np.ndarray,
    ip: np.ndarray,
    fraud_pattern: str | None,
) -> dict[str, np.ndarray]:
    """Transaction columns keyed like the table, plus the positions and the fraud label."""
    n = len(cust)
    currency = currency_of(pop.merchant_country[merchant])
    return {
        "customer": cust,
        "merchant": merchant,
        "datetime": when,
        "amount": convert(amount_eur, currency),
        "currencyid": currency,
        "paymentmethodid": method,
        "paymentinstrumentid": instrument,
        "deviceid": device,
        "customerid": pop.customer_id[cust],
        "billingaddressid": pop.customer_address[cust],
        "transactionlocationid": location,
        "ipaddress": ip,
        "merchantid": pop.merchant_id[merchant],
        "is_fraud": np.full(n, fraud_pattern is not None, dtype=np.int8),
        "fraud_pattern": np.full(n, fraud_pattern, dtype=object),
    }
