"""Run inside a guest (stdlib only): network checks, one JSON result per check.

``python3 probe.py '<json list of checks>'`` prints a JSON list of results. A check is
``{"kind": "connect"|"udp"|"http"|"https"|"dns", ...}``; each result holds ``ok`` and,
when not ok, ``error`` (``refused``, ``timeout``, ``reset``, ``nxdomain`` or the
exception's name), and how long it took (``ms``)."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time

TIMEOUT = 5.0


def _error(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return "nxdomain"
    return f"{type(exc).__name__}: {exc}"


def _read_response(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data:
        raise ConnectionResetError("no response")
    return data


def _http(sock: socket.socket | ssl.SSLSocket, host: str, path: str) -> dict[str, object]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = _read_response(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        parsed: object = json.loads(body)
    except ValueError:
        parsed = len(body)
    return {"status": status, "body": parsed}


def check(item: dict[str, object]) -> dict[str, object]:
    kind = item["kind"]
    host = str(item.get("host", ""))
    port = int(item.get("port", 443 if kind == "https" else 80))  # type: ignore[call-overload]
    try:
        if kind == "dns":
            return {
                "ok": True,
                "addresses": sorted({a[4][0] for a in socket.getaddrinfo(host, 80, socket.AF_INET)}),
            }
        if kind == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(float(item.get("timeout", 2)))  # type: ignore[arg-type]
                udp.sendto(b"ping", (host, port))
                return {"ok": udp.recvfrom(100)[0] == b"ping"}
        if kind == "hold":  # open `count` connections and keep them: how many were accepted
            held, refused = [], 0
            for _ in range(int(item["count"])):  # type: ignore[call-overload]
                try:
                    held.append(socket.create_connection((host, port), timeout=3))
                except OSError:
                    refused += 1
            for sock in held:
                sock.close()
            return {"ok": True, "held": len(held), "refused": refused}
        if kind == "raw":  # send these bytes (hex), return what comes back
            with socket.create_connection((host, port), timeout=float(item.get("timeout", TIMEOUT))) as raw:  # type: ignore[arg-type]
                for chunk in item["chunks"]:  # type: ignore[attr-defined]
                    raw.sendall(bytes.fromhex(chunk))
                return {"ok": True, "reply": _read_response(raw)[:2000].decode("latin-1")}
        address = str(item.get("ip") or host)
        with socket.create_connection((address, port), timeout=float(item.get("timeout", TIMEOUT))) as raw:  # type: ignore[arg-type]
            if kind == "connect":
                raw.sendall(b"hello")
                return {"ok": raw.recv(5) == b"hello"}
            if kind == "http":
                return {
                    "ok": True,
                    **_http(raw, str(item.get("header_host") or host), str(item.get("path", "/echo"))),
                }
            context = (
                ssl.create_default_context() if item.get("verify", True) else ssl._create_unverified_context()
            )
            if not item.get("verify", True):
                context.check_hostname = False
            sni = str(item.get("sni") or host)
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                return {"ok": True, **_http(tls, sni, str(item.get("path", "/echo")))}
    except BaseException as exc:
        return {"ok": False, "error": _error(exc)}
    raise ValueError(kind)


def main() -> None:
    results = []
    for item in json.loads(sys.argv[1]):
        started = time.monotonic()
        result = check(item)
        result["ms"] = round((time.monotonic() - started) * 1000, 1)
        results.append(result)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
