"""Data governance: the classification catalog, the one source of what every field holds."""
