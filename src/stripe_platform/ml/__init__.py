"""Machine learning on the platform's data: fraud models first, built to be reused.

- :mod:`stripe_platform.ml.contract`: the transactions contract. Every source of transactions (a
  user's parquet file, the platform's own PostgreSQL) becomes one canonical Arrow table
  (``CANONICAL_SCHEMA``), checked with errors that name the file and the column.
- :mod:`stripe_platform.ml.features`: the one feature definition (``FEATURES``, a list of
  ``FeatureSpec``), computed point in time from history by DuckDB (``batch_features``) or from
  online state one transaction at a time (``OnlineFeatureState``), with the same numbers;
  ``FEATURE_NAMES`` and ``FEATURE_VERSION`` tie a model to the definition it was trained with.
"""
