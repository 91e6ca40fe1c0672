"""ASGI entry point: the control-plane API, admin and (later) the data-plane edge."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "watasu.settings")
application = get_asgi_application()
