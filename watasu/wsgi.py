"""WSGI entry point (the embedded server uses the ASGI one)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "watasu.settings")
application = get_wsgi_application()
