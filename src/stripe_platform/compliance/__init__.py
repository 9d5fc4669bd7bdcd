"""Privacy and compliance (issue 23, docs/compliance.md): data-subject requests across every store
the catalog lists, consent and do-not-sell, the breach clock, the daily controls and the compliance
dashboard's KPIs. Reads the catalog, the key provider, the access policy and the incidents; keeps
no copy of them."""
