"""Usage: the cost ledger actor and budgets (the gateway's book of spend per key)."""
