"""The host's agent client against a hostile guest: whatever a guest's port answers, a call
ends at its timeout as a whole and never reads more than MAX_REPLY into the host.

The guest here is a socket server playing a replaced agent (a sandbox's root can replace
the real one), which is exactly what the client must withstand.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from sandboxes.runtime.agent_client import MAX_REPLY, AgentClient, AgentError


@pytest.fixture
def hostile_guest() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Serve one connection with `answer` on a loopback port; yields a starter returning the port."""
    listeners: list[socket.socket] = []

    def start(answer: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)  # the request
                with contextlib.suppress(OSError):  # the client hung up, as it should
                    answer(conn)

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


def test_a_reply_declaring_more_than_the_limit_is_refused_unread(hostile_guest) -> None:  # type: ignore[no-untyped-def]
    def huge(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 419430400\r\n\r\n" + b" " * 65536)

    client = AgentClient(hostile_guest(huge), secret="s")

    with pytest.raises(AgentError) as refused:
        client.request("POST", "/init", {"secret": "x"}, timeout=30)

    assert refused.value.status == 502
    assert refused.value.body["error"] == "reply_too_large"


def test_an_undeclared_reply_past_the_limit_is_cut_at_the_limit(hostile_guest) -> None:  # type: ignore[no-untyped-def]
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        while True:
            conn.sendall(b" " * 65536)

    client = AgentClient(hostile_guest(endless), secret="s")

    with pytest.raises(AgentError) as refused:
        client.request("GET", "/health", timeout=30)

    assert refused.value.body == {
        "error": "reply_too_large",
        "message": f"agent reply over {MAX_REPLY} bytes",
    }


def test_a_guest_dribbling_bytes_is_cut_at_the_calls_timeout(hostile_guest) -> None:  # type: ignore[no-untyped-def]
    # given a guest that sends a byte at a time, each well inside the per-read timeout
    paced = threading.Event()  # never set: the guest's own pace between bytes, not a wait on us

    def dribble(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(600):
            conn.sendall(b" ")
            paced.wait(0.05)

    client = AgentClient(hostile_guest(dribble), secret="s")

    # when the host calls it with a 2 s budget, then the call is cut at that budget (left to
    # finish, the guest would close after 600 bytes: an IncompleteRead, never a TimeoutError)
    with pytest.raises(TimeoutError, match="did not answer POST /init within 2 s"):
        client.request("POST", "/init", {"secret": "x"}, timeout=2)
