"""Watasu guest agent: runs inside every sandbox VM, stdlib only (Python 3.11+).

It is the data plane's far end. Besides the host's own routes (health, init) it serves the
``/runtime/v1`` protocol of the wire spec (files, directories, processes over WebSocket
with replayable cursors, PTY, filesystem watch, git helpers) and ``/proxy/<port>/...`` for
preview traffic. The host-side edge authenticates clients and forwards their requests
here verbatim, with ``Authorization`` replaced by the credential of its role. The host
runs its own commands through the same ``/runtime/v1/process`` registry, so there is one
list of processes, whoever started them.

The image holds this package as one zipapp (``sandboxes.runtime.guest.build``); its
modules, by concern: ``server`` (HTTP parsing, bounded bodies, upgrades), ``websocket``
(RFC 6455), ``routing`` (requests, router, shared state), ``routes`` (the handlers),
``identity`` (secret, role credentials, clock, entropy, hostname), ``files``,
``processes`` and ``events`` (managed processes, PTY, replayable output), ``patch``
(apply_diff), ``watch`` (inotify), ``git`` and ``proxy`` (previews).

Authentication:
- At boot the only accepted credential is the boot token the host put on the kernel
  command line (``watasu.token=``): only the host and this guest can read it.
- ``POST /init`` must carry the *current* credential and installs a new secret. While
  the agent is *fresh* (just booted, or sealed as a template with ``"seal": true``) the
  new secret must differ from the current one and nothing but /init and /health is
  served. A clone restored from a template snapshot therefore accepts exactly one thing:
  an init authenticated by the template secret, which rotates it away. If anyone else
  won that race, the host's init gets 401 and the host destroys the sandbox.
- Every other route needs a bearer credential, and which one depends on the route
  (defence in depth behind the edge's own path checks): ``/init`` takes only the secret
  itself, which the edge never sends; ``/runtime/v1/*`` takes the secret (the host's own
  commands) or the *data-plane* credential, and ``/proxy/*`` takes only the *preview*
  credential, both derived from the secret (``role_secret``). A request that reaches the
  agent with a path other than the one the edge checked therefore finds its credential
  refused.
"""
