"""Runtime intervals, storage samples and prepaid balances (built in the billing issue)."""
