"""The transformation: the dbt project (dbt_project/) run for the active profile's warehouse."""
