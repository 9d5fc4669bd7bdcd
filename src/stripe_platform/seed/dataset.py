"""One seed run's data, built in memory from a SeedSpec (deterministic), before any write."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from stripe_platform.seed import fraud
from stripe_platform.seed.generate import (
    Entities,
    generate_entities,
    legit_transactions,
    to_ms,
    ts_array,
)
from stripe_platform.seed.lifecycle import life_cycles
from stripe_platform.seed.spec import SeedSpec


@dataclass
class Dataset:
    spec: SeedSpec
    entities: Entities
    transactions: pa.Table  # Transaction rows
    state_changes: pa.Table  # TransactionStateChanges rows, grouped by transaction
    customer_pos: np.ndarray  # per transaction: position in the population's customers
    is_fraud: np.ndarray
    fraud_pattern: np.ndarray

    @property
    def devices(self) -> pa.Table:
        return self.entities.devices


def null_if_zero(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.int64(), mask=values == 0)


def transaction_table(
    ids: np.ndarray, cols: dict[str, np.ndarray], status: np.ndarray, updated_ms: np.ndarray
) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "transactionstatusid": status.astype(np.int16),
            "merchantid": cols["merchantid"],
            "amount": cols["amount"],
            "currencyid": cols["currencyid"],
            "paymentmethodid": cols["paymentmethodid"],
            "paymentinstrumentid": null_if_zero(cols["paymentinstrumentid"]),
            "deviceid": null_if_zero(cols["deviceid"]),
            "customerid": cols["customerid"],
            "billingaddressid": cols["billingaddressid"],
            "transactionlocationid": cols["transactionlocationid"],
            "ipaddress": pa.array(cols["ipaddress"], pa.string()),
            "datetime": ts_array(cols["datetime"]),
            "createdat": ts_array(cols["datetime"]),
            "updatedat": ts_array(updated_ms),
        }
    )


def state_change_table(changes: dict[str, np.ndarray]) -> pa.Table:
    from_status = changes["fromstatusid"]
    return pa.table(
        {
            "transactionid": changes["transactionid"],
            "transactiondatetime": ts_array(changes["transactiondatetime"]),
            "fromstatusid": pa.array(from_status, pa.int16(), mask=from_status < 0),
            "tostatusid": changes["tostatusid"].astype(np.int16),
            "reason": pa.array(changes["reason"], pa.string()),
            "updatedby": pa.array(changes["updatedby"], pa.string()),
            "updatedat": ts_array(changes["updatedat"]),
        }
    )


def build(spec: SeedSpec) -> Dataset:
    rng = np.random.default_rng(spec.seed)
    entities = generate_entities(spec, rng)
    pop = entities.population
    n_fraud = round(spec.n_transactions * spec.fraud_rate)
    legit = legit_transactions(rng, pop, spec.n_transactions - n_fraud, spec.start, spec.end)
    parts, fraud_devices = fraud.plant(
        rng,
        pop,
        n_fraud,
        spec.start,
        spec.end,
        next_device_id=entities.devices.num_rows + 1,
        seed=spec.seed,
    )
    if fraud_devices is not None:
        entities.devices = pa.concat_tables([entities.devices, fraud_devices])
    cols = {k: np.concatenate([legit[k], *(p[k] for p in parts)]) for k in legit}
    order = np.argsort(cols["datetime"], kind="stable")  # ids grow with time, as an identity would
    cols = {k: v[order] for k, v in cols.items()}
    ids = np.arange(1, len(order) + 1)
    changes, final, updated = life_cycles(
        rng, ids, cols["datetime"], cols["fraud_pattern"], to_ms(spec.end)
    )
    return Dataset(
        spec=spec,
        entities=entities,
        transactions=transaction_table(ids, cols, final, updated),
        state_changes=state_change_table(changes),
        customer_pos=cols["customer"],
        is_fraud=cols["is_fraud"],
        fraud_pattern=cols["fraud_pattern"],
    )
