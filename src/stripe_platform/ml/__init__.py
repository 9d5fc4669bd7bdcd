"""Machine learning on the platform's data: fraud models first, built to be reused.

- :mod:`stripe_platform.ml.contract`: the transactions contract. Every source of transactions (a
  user's parquet file, the platform's own PostgreSQL) becomes one canonical Arrow table
  (``CANONICAL_SCHEMA``), checked with errors that name the file and the column.
- :mod:`stripe_platform.ml.features`: the one feature definition (``FEATURES``, a list of
  ``FeatureSpec``), computed point in time from history by DuckDB (``batch_features``) or from
  online state one transaction at a time (``OnlineFeatureState``), with the same numbers;
  ``FEATURE_NAMES`` and ``FEATURE_VERSION`` tie a model to the definition it was trained with.
- :mod:`stripe_platform.ml.split`, :mod:`~stripe_platform.ml.rules`,
  :mod:`~stripe_platform.ml.evaluate`: the time split with its label-delay gap, the rules baseline
  (amount and velocity thresholds on the same features), the metrics.
- :mod:`stripe_platform.ml.registry`: MLflow (the home's SQLite store or a tracking URI), models
  addressed by alias (``models:/fraud@champion``), the promotion gate's rule, loading checked
  against the features. :mod:`stripe_platform.ml.train`: ``train_fraud``, the training entry point.
"""
