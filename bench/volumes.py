"""Volume benchmark: what a mount adds to a create, detached file latency, guest throughput.

    make bench-volumes     (or: .venv/bin/python bench/volumes.py [--runs 8] [--mib 256])

In one run, on one machine:
  1. sandbox create to ready without volumes, then with one volume mounted (the same
     service call, the same snapshot start): the mount's cost = p50 difference
     (target <= 300 ms);
  2. detached 1 KiB write then read of a volume through the HTTP API (uvicorn), after a
     few warm-up rounds (target p50 <= 250 ms);
  3. inside one guest, sequential write (fsync'd) and read (caches dropped) of --mib MiB
     on the volume and on the root disk: the volume's share of the root disk's MiB/s
     (target >= 80 %).
Uses PostgreSQL database `watasu_bench` (created when missing) and its own data directory.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import secrets
import time
import urllib.request

from common import ms, percentile, prepare_database, start_uvicorn, use_bench_environment

ROOT = use_bench_environment()


def creates(user, runs: int, mounts: tuple) -> list[float]:  # type: ignore[no-untyped-def]
    from sandboxes import services
    from sandboxes.specs import CreateSpec

    times = []
    for _ in range(runs):
        started = time.perf_counter()
        sandbox, _ = services.sandbox_create(user=user, spec=CreateSpec(volume_mounts=mounts))
        times.append(time.perf_counter() - started)
        services.sandbox_destroy(sandbox=sandbox)
    return times


def detached_round_trips(port: int, key: str, volume_id: int, runs: int) -> list[float]:
    base = f"http://127.0.0.1:{port}/v1/volumes/{volume_id}/files"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(
        {"path": "/bench/1k.bin", "content_b64": base64.b64encode(b"x" * 1024).decode(), "force": True}
    )
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        put = urllib.request.Request(base, data=body.encode(), headers=headers, method="PUT")
        urllib.request.urlopen(put, timeout=30).read()
        get = urllib.request.Request(f"{base}?path=/bench/1k.bin", headers=headers)
        got = json.load(urllib.request.urlopen(get, timeout=30))
        times.append(time.perf_counter() - started)
        assert len(base64.b64decode(got["file"]["content_b64"])) == 1024
    return times


def throughput(client, directory: str, mib: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(write MiB/s, read MiB/s) of one sequential file in `directory` of the guest."""

    def rate(command: str) -> float:
        result = client.exec(command, timeout=600)
        assert result["exit_code"] == 0, result
        match = re.search(r"([\d.]+) s,", result["stderr"])
        assert match, result["stderr"]
        return mib / float(match.group(1))

    path = f"{directory}/bench.bin"
    write = rate(f"dd if=/dev/zero of={path} bs=1M count={mib} conv=fsync 2>&1 >/dev/null | tail -1 >&2")
    read = rate(
        f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if={path} of=/dev/null bs=1M 2>&1 | tail -1 >&2"
    )
    client.exec(f"rm -f {path}", timeout=60)
    return write, read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--mib", type=int, default=256)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.core.management import call_command

    from sandboxes import services
    from sandboxes.models import Sandbox
    from sandboxes.runtime import vm
    from sandboxes.specs import CreateSpec
    from teams.models import User
    from templates_app.services import base_template_ensure
    from volumes.models import Volume
    from volumes.mounts import Mount
    from volumes.services import volume_create, volume_delete

    host = services.host_register_local()
    base_template_ensure(host=host)
    team = f"bench-{secrets.token_hex(3)}"
    out = io.StringIO()
    call_command("create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=out)
    key = out.getvalue().strip()
    user = User.objects.get(email=f"{team}@example.com")
    volume = volume_create(user=user, name=f"bench-{secrets.token_hex(3)}", team=team)
    mounts = (Mount(path="/data", name=volume.name),)
    try:
        creates(user, 1, ())  # warm the snapshot's page cache
        plain = creates(user, args.runs, ())
        mounted = creates(user, args.runs, mounts)
        print(f"create without volumes:              {ms(plain)}")
        print(f"create with one volume mounted:      {ms(mounted)}")
        added = (percentile(mounted, 0.5) - percentile(plain, 0.5)) * 1000
        print(f"the mount adds at p50:               {added:7.1f} ms (target <= 300 ms)")

        port = 18000 + secrets.randbelow(1000)
        server = start_uvicorn(ROOT, port)
        try:
            detached_round_trips(port, key, volume.pk, 5)  # warm-up
            trips = detached_round_trips(port, key, volume.pk, 50)
            print(f"detached 1 KiB write + read (HTTP):  {ms(trips)} (target p50 <= 250 ms)")
        finally:
            server.terminate()
            server.wait(timeout=30)

        sandbox, _ = services.sandbox_create(user=user, spec=CreateSpec(volume_mounts=mounts))
        try:
            client = vm.agent_client(Sandbox.objects.get(pk=sandbox.pk))
            root_w, root_r = throughput(client, "/root", args.mib)
            vol_w, vol_r = throughput(client, "/data", args.mib)
        finally:
            services.sandbox_destroy(sandbox=sandbox)
        print(
            f"guest sequential write, root disk:   {root_w:7.1f} MiB/s   volume: {vol_w:7.1f} MiB/s "
            f"({vol_w / root_w * 100:5.1f} %, target >= 80 %)"
        )
        print(
            f"guest sequential read, root disk:    {root_r:7.1f} MiB/s   volume: {vol_r:7.1f} MiB/s "
            f"({vol_r / root_r * 100:5.1f} %, target >= 80 %)"
        )
    finally:
        volume_delete(volume=Volume.objects.get(pk=volume.pk))


if __name__ == "__main__":
    main()
