"""ASGI entry point: the data-plane edge (sandboxes.edge) in front of Django.

The edge serves `/sandboxes-dp/...`, `/sandboxes-preview/...` and the
`*.sandbox.<domain>` hosts, streaming to the guest agents; every other request
reaches Django's control-plane API and admin.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "watasu.settings")
django_application = get_asgi_application()

from sandboxes.edge.app import EdgeApp  # noqa: E402  (needs the apps loaded by get_asgi_application)
from watasu.logredact import install_on_uvicorn  # noqa: E402

install_on_uvicorn()

application = EdgeApp(django_application)
