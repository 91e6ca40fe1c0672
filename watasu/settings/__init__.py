"""Settings package: `base` holds everything, read from the environment."""

from watasu.settings.base import *  # noqa: F403
