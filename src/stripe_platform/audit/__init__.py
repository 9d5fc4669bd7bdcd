"""The audit trail: access logs (issue 21), the sealed trail, monitoring and incidents (issue 22)."""
