"""Sandbox templates and their immutable versions (built in the templates issue)."""
