"""Named team volumes (built in the volumes issue)."""
