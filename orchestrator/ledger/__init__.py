"""The ledger: models and the store (all database access)."""
