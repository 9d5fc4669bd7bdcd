"""Planted fraud: the ground truth fraud models learn from. Documented in docs/seed.md.

Each pattern returns transaction columns like generate.legit_transactions, labelled with
is_fraud=1 and its pattern name, plus any device rows the fraudster brought.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa

from stripe_platform.seed import reference as ref
from stripe_platform.seed.generate import (
    MS_PER_HOUR,
    Population,
    country_ips,
    device_rows,
    offsets,
    to_ms,
    transaction_columns,
    wrap_days,
)

PATTERN_SHARE = {
    "card_testing": 0.30,
    "account_takeover": 0.30,
    "odd_hour_large_amount": 0.20,
    "colluding_merchant": 0.20,
}
# Probability that a completed fraudulent payment is disputed by the cardholder.
DISPUTE_RATE = {
    "card_testing": 0.5,
    "account_takeover": 0.85,
    "odd_hour_large_amount": 0.7,
    "colluding_merchant": 0.75,
}


def _foreign_country(rng: np.random.Generator, home: np.ndarray) -> np.ndarray:
    n_countries = len(ref.COUNTRIES)
    shift = rng.integers(1, n_countries, len(home))
    return (home + shift) % n_countries


def _merchants_in(
    pop: Population, industries: tuple[int, ...], sizes: tuple[int, ...]
) -> np.ndarray:
    found = np.flatnonzero(
        np.isin(pop.merchant_industry, industries) & np.isin(pop.merchant_size, sizes)
    )
    return found if len(found) else np.arange(len(pop.merchant_id))


def _card_of(pop: Population, cust: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    credit, debit = pop.customer_card[cust, 0], pop.customer_card[cust, 1]
    return np.where(credit > 0, 1, 2), np.where(credit > 0, credit, debit)


def _episodes(rng: np.random.Generator, total: int, low: int, high: int) -> np.ndarray:
    """Episode index per transaction: bursts of low..high transactions adding up to total."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(low, high + 1)))
    sizes[-1] -= sum(sizes) - total
    return np.repeat(np.arange(len(sizes)), [s for s in sizes if s > 0])


def plant(
    rng: np.random.Generator,
    pop: Population,
    n_fraud: int,
    start: dt.date,
    end: dt.date,
    next_device_id: int,
    seed: int,
) -> tuple[list[dict[str, np.ndarray]], pa.Table | None]:
    counts = dict(
        zip(PATTERN_SHARE, rng.multinomial(n_fraud, list(PATTERN_SHARE.values())), strict=True)
    )
    start_ms, end_ms = to_ms(start), to_ms(end)
    nc = len(pop.customer_id)
    parts: list[dict[str, np.ndarray]] = []
    new_devices: list[pa.Table] = []

    def fraud_devices(owners: np.ndarray, first_seen: np.ndarray) -> np.ndarray:
        nonlocal next_device_id
        ids = np.arange(next_device_id, next_device_id + len(owners))
        next_device_id += len(owners)
        types = rng.choice(3, len(owners), p=[0.3, 0.1, 0.6])
        new_devices.append(device_rows(rng, seed, ids, pop.customer_id[owners], types, first_seen))
        return ids

    # Card testing: bursts of tiny charges on one stolen card, seconds apart, from an unknown
    # device abroad, at small digital-goods merchants. Most are declined.
    if counts["card_testing"]:
        episode = _episodes(rng, counts["card_testing"], 5, 20)
        k = episode.max() + 1
        victim = rng.choice(nc, k)
        merchants = _merchants_in(pop, ref.CARD_TESTING_INDUSTRIES, (1,))
        shop = rng.choice(merchants, k)
        t0 = rng.integers(start_ms, end_ms - MS_PER_HOUR, k)
        abroad = _foreign_country(rng, pop.customer_country[victim])
        device = fraud_devices(victim, t0)
        gaps = rng.exponential(25_000, len(episode)).astype(np.int64)
        elapsed = np.cumsum(gaps)
        first = np.searchsorted(episode, episode)  # index of each row's episode start
        when = t0[episode] + elapsed - (elapsed - gaps)[first]
        amount = np.where(
            rng.random(len(episode)) < 0.3, 1.0, np.round(rng.uniform(0.5, 5, len(episode)), 2)
        )
        method, card = _card_of(pop, victim)
        loc = np.array([rng.choice(pop.locations_by_country[c]) for c in abroad])
        ip = country_ips(rng, abroad)
        parts.append(
            transaction_columns(
                pop,
                victim[episode],
                shop[episode],
                np.minimum(when, end_ms - 1),
                amount,
                method[episode],
                card[episode],
                device[episode],
                loc[episode],
                ip[episode],
                "card_testing",
            )
        )

    # Account takeover: a new device, a foreign IP and a transaction country that differs from the
    # billing country; a few larger purchases within the hour.
    if counts["account_takeover"]:
        episode = _episodes(rng, counts["account_takeover"], 1, 4)
        k = episode.max() + 1
        victim = rng.choice(nc, k)
        t0 = rng.integers(start_ms, end_ms - MS_PER_HOUR, k)
        abroad = _foreign_country(rng, pop.customer_country[victim])
        device = fraud_devices(victim, t0)
        merchants = _merchants_in(pop, ref.ATO_INDUSTRIES, (1, 2, 3))
        shop = rng.choice(merchants, len(episode))
        when = t0[episode] + rng.integers(0, MS_PER_HOUR, len(episode))
        amount = rng.lognormal(5.2, 0.5, len(episode))
        method, card = _card_of(pop, victim)
        loc = np.array([rng.choice(pop.locations_by_country[c]) for c in abroad])
        ip = country_ips(rng, abroad)
        parts.append(
            transaction_columns(
                pop,
                victim[episode],
                shop,
                np.minimum(when, end_ms - 1),
                amount,
                method[episode],
                card[episode],
                device[episode],
                loc[episode],
                ip[episode],
                "account_takeover",
            )
        )

    # Unusually large amount at an odd hour for this customer (1-4 am local), on their own device.
    if counts["odd_hour_large_amount"]:
        n = counts["odd_hour_large_amount"]
        victim = rng.choice(nc, n)
        day = rng.integers(0, (end - start).days, n)
        local_hour = rng.integers(1, 5, n)
        when = (
            start_ms
            + day * 86_400_000
            + (local_hour - offsets(pop.customer_country[victim])) * MS_PER_HOUR
            + rng.integers(0, MS_PER_HOUR, n)
        )
        typical = np.exp(3.4) * np.sqrt(pop.customer_spend[victim])
        amount = typical * rng.uniform(10, 40, n)
        merchants = _merchants_in(pop, (1, 2, 8), (1, 2, 3))
        shop = rng.choice(merchants, n)
        method, card = _card_of(pop, victim)
        parts.append(
            transaction_columns(
                pop,
                victim,
                shop,
                wrap_days(when, start, end),
                amount,
                method,
                card,
                pop.customer_primary_device[victim],
                pop.customer_location[victim],
                pop.customer_ip[victim],
                "odd_hour_large_amount",
            )
        )

    # Colluding merchant: a few small merchants push round-amount, card-not-present charges on
    # many different stolen cards, spread over time.
    if counts["colluding_merchant"]:
        n = counts["colluding_merchant"]
        shop = rng.choice(pop.colluding_merchants, n)
        victim = rng.choice(nc, n)
        when = rng.integers(start_ms, end_ms, n)
        amount = rng.choice([50.0, 100.0, 150.0, 200.0, 250.0, 500.0], n)
        method, card = _card_of(pop, victim)
        mcountry = pop.merchant_country[shop]
        parts.append(
            transaction_columns(
                pop,
                victim,
                shop,
                when,
                amount,
                method,
                card,
                np.zeros(n, dtype=np.int64),
                pop.merchant_location[shop],
                country_ips(rng, mcountry),
                "colluding_merchant",
            )
        )

    devices = pa.concat_tables(new_devices) if new_devices else None
    return parts, devices
