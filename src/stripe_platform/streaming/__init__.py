"""The real-time consumers of change data: fraud scoring on the CDC stream (ARCHITECTURE §6)."""
