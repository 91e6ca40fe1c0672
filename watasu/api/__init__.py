"""Shared control-plane API conventions: auth scopes, errors, pagination, idempotency."""
