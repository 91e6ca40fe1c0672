"""The data-plane edge: an ASGI app in front of Django in the web process.

It serves `{PUBLIC_URL}/sandboxes-dp/<route_token>/runtime/v1/...` (and the
host form `<route_token>.sandbox.<domain>`), preview ports and signed file
URLs by authenticating the caller, making sure the sandbox runs, and
streaming HTTP and WebSocket traffic to the guest agent. Everything else goes
to Django. Modules: `routing` (scope -> Route), `access` (database, auth,
auto-resume; sync), `signing` (signed file URLs), `http` and `websocket`
(the proxies), `app` (the ASGI entry point).
"""
