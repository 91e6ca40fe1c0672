"""Many hosts: what a host worker costs a create, how fast template files travel, and how
evenly placement spreads creates over two hosts.

    make bench-hosts          (or: .venv/bin/python bench/hosts.py [--runs 20] [--creates 100])

In one run, on one machine (PostgreSQL database `watasu_bench`, Redis db 11):
  1. SDK create p50 from a warm pool, in-process (the web process drives the VMs, today's
     single-machine mode) and through a host worker (`scripts/run-host`, its own data
     directory, queue and address 127.0.0.2; the web process with
     WATASU_RUNTIME_IN_PROCESS=false): the difference is the host worker's cost (target
     <= +30 ms). The pool is refilled between creates, untimed, as the pool sweep does.
  2. The transfer of the `base` template version: its push to the artifact store (a
     directory here; bench/artifacts.py measures S3) and a pull into an empty directory,
     in MiB/s.
  3. `--creates` creates through the API over two hosts (the in-process one and the
     worker's), no pool, at most 8 sandboxes alive at once (the oldest destroyed first),
     and the skew |a - b| / total (target <= 10 %), both hosts of equal capacity.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ms, percentile, prepare_database, sdk, start_uvicorn, use_bench_environment

ROOT = use_bench_environment()
REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
os.environ["REDIS_URL"] = REDIS
WORKER_ADDRESS = "127.0.0.2"


def sdk_creates(port: int, key: str, runs: int, refill) -> list[float]:  # type: ignore[no-untyped-def]
    """SDK creates (each with a first command), the warm pool refilled before each, untimed."""
    return list(sdk(port, key, "create", runs, between=refill)["create"])


def server(port: int, **env: str) -> subprocess.Popen[bytes]:
    saved = dict(os.environ)
    os.environ.update(env, WATASU_PUBLIC_URL=f"http://127.0.0.1:{port}")
    try:
        return start_uvicorn(ROOT, port, "--ws", "websockets-sansio")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def host_worker(name: str, data_dir: Path, **extra: str) -> subprocess.Popen[bytes]:
    from django.conf import settings

    env = {
        **os.environ,
        "WATASU_HOST_NAME": name,
        "WATASU_HOST_ADDRESS": WORKER_ADDRESS,
        "WATASU_DATA_DIR": str(data_dir),
        "WATASU_VM_PREFIX": f"{os.environ['WATASU_VM_PREFIX']}{name}-",
        "WATASU_HOST_HEARTBEAT_SECONDS": "1",
        "HOST_CONCURRENCY": "8",
        "WATASU_ARTIFACT_STORE": settings.ARTIFACT_STORE,  # the one store every host uses
        "WATASU_SECRET_KEY": settings.SECRET_KEY,  # and one key (steps are sealed with it)
        "WATASU_ENCRYPTION_KEYS": ",".join(settings.ENCRYPTION_KEYS),
        **extra,
    }
    log = open(data_dir.parent / f"{name}.log", "ab")  # noqa: SIM115 (the worker's, closed with it)
    return subprocess.Popen(
        [str(ROOT / "scripts" / "run-host")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def wait_registered(worker: subprocess.Popen[bytes], work: Path) -> None:
    from django.utils import timezone

    from sandboxes.models import Host

    deadline = time.monotonic() + 120
    started = timezone.now()
    while not Host.objects.filter(name="bench-w", last_seen_at__gt=started).exists():
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError(f"the host worker did not register; see {work / 'bench-w.log'}")
        time.sleep(0.2)


def api(port: int, key: str, method: str, path: str, body: dict | None = None) -> dict:  # type: ignore[type-arg]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        raw = response.read()
    return json.loads(raw) if raw else {}


def _room_line(room) -> str:  # type: ignore[no-untyped-def]
    from django.utils import timezone

    host = room.host
    seen = (timezone.now() - host.last_seen_at).total_seconds() if host.last_seen_at else -1
    placed = host.last_placed_at.strftime("%S.%f") if host.last_placed_at else "-"
    return f"{host.name}:mem={room.free_memory_mb},cpu={room.free_cpu},seen={seen:.1f}s,placed={placed}"


def spread(port: int, key: str, creates: int) -> dict[str, int]:
    from sandboxes.models import Sandbox
    from sandboxes.placement import hosts_with_room

    placed: dict[str, int] = {}
    alive: list[str] = []
    order: list[str] = []
    trace = os.environ.get("BENCH_TRACE") == "1"
    for _ in range(creates):
        if trace:  # what placement sees before each create
            print(" ".join(_room_line(room) for room in hosts_with_room()), flush=True)
        sandbox_id = api(port, key, "POST", "/sandboxes", {"template": "base", "timeout": 600})["sandbox"][
            "id"
        ]
        name = Sandbox.objects.select_related("host").get(pk=int(sandbox_id)).host.name
        placed[name] = placed.get(name, 0) + 1
        order.append(name)
        alive.append(sandbox_id)
        if len(alive) > 8:
            api(port, key, "DELETE", f"/sandboxes/{alive.pop(0)}")
    for sandbox_id in alive:
        api(port, key, "DELETE", f"/sandboxes/{sandbox_id}")
    names = sorted(placed)
    print("placements in order:", "".join(str(names.index(name)) for name in order), "of", names)
    return placed


def transfer(version) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Push the version's artifact to a fresh directory store and pull it back: MiB/s each."""
    from sandboxes.runtime import artifact_store
    from templates_app import artifacts

    with tempfile.TemporaryDirectory(prefix="watasu-bench-store-") as tmp:
        store = artifact_store.FileStore(Path(tmp) / "store")
        started = time.perf_counter()
        digest = artifacts.push(Path(version.artifact_dir), store)
        pushed = time.perf_counter() - started
        dest = Path(tmp) / "pulled"
        started = time.perf_counter()
        artifact_store.pull_tree(store, digest, dest, prepare=artifacts._localise)
        pulled = time.perf_counter() - started
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return pushed, pulled, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--creates", type=int, default=100)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from sandboxes import hostcalls, pool
    from sandboxes.models import Host, HostState, PooledVm, Sandbox
    from sandboxes.runtime import driver_for
    from sandboxes.services import host_register_local
    from teams.models import Team
    from templates_app.services import base_template_ensure

    Sandbox.objects.all().delete()
    PooledVm.objects.all().delete()
    Host.objects.exclude(queue="").delete()
    local = host_register_local()
    Host.objects.filter(pk=local.pk).update(state=HostState.UP)  # an earlier run stopped midway
    version = base_template_ensure(host=local)
    team = f"bench-{secrets.token_hex(3)}"
    out = io.StringIO()
    call_command("create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=out)
    key = out.getvalue().strip()
    Team.objects.filter(slug=team).update(max_running_instances=100, max_vcpu_count=100, max_memory_mb=10**6)
    settings.POOL_BASE_SIZE = 1

    pushed, pulled, size = transfer(version)
    mib = size / 2**20
    print(
        f"base artifact: {mib:.0f} MiB; push {mib / pushed:6.0f} MiB/s, "
        f"pull {mib / pulled:6.0f} MiB/s (a directory store)"
    )

    work = Path(settings.DATA_DIR) / "bench-hosts"
    shutil.rmtree(work, ignore_errors=True)
    (work / "w").mkdir(parents=True)
    port = 18000 + secrets.randbelow(1000)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # 1a. in-process: this machine's host driven by the web process
        web = server(port)
        processes.append(web)

        def refill_local() -> None:  # this host's pool only (a pool sweep would also queue the worker's)
            from django.utils import timezone

            while (pool.pool_host_run(local, timezone.now()) or {}).get("more"):
                pass

        inproc = sdk_creates(port, key, args.runs, refill_local)
        print(f"SDK create from a warm pool, in-process:         {ms(inproc)}")
        # 1b. through a host worker: the web process drives nothing itself
        worker = host_worker("bench-w", work / "w")
        processes.append(worker)
        wait_registered(worker, work)
        remote = Host.objects.get(name="bench-w")
        Host.objects.filter(pk=local.pk).update(state=HostState.DRAINING)
        settings.POOL_ENABLED = False
        refill_local()  # the local pool drained
        settings.POOL_ENABLED = True
        web.terminate()
        web.wait(timeout=30)
        web = server(port, WATASU_RUNTIME_IN_PROCESS="false")
        processes.append(web)

        def refill_remote() -> None:
            from django.utils import timezone

            while (
                hostcalls.remote(remote, "sandboxes.pool.pool_host_run", (remote, timezone.now()), {}) or {}
            ).get("more"):
                pass

        through = sdk_creates(port, key, args.runs, refill_remote)
        print(f"SDK create from a warm pool, via a host worker:  {ms(through)}")
        extra = (percentile(through, 0.5) - percentile(inproc, 0.5)) * 1000
        print(
            f"  host worker cost at p50: {extra:+.1f} ms (target <= +30 ms; Redis broker and result backend)"
        )
        # 3. placement over two hosts of equal capacity, no pool
        Host.objects.filter(pk=local.pk).update(state=HostState.UP)
        Host.objects.filter(pk=remote.pk).update(
            cpu_capacity=local.cpu_capacity, memory_capacity_mb=local.memory_capacity_mb
        )
        settings.POOL_ENABLED = False
        refill_local()  # drained: no pool VM holds memory on either host (placement counts them)
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        worker = host_worker("bench-w", work / "w", WATASU_POOL_ENABLED="false")
        processes.append(worker)
        wait_registered(worker, work)
        refill_remote()  # its pool off: the run drains it
        assert not PooledVm.objects.exists(), "a warm pool VM would skew the placement figure"
        web.terminate()
        web.wait(timeout=30)
        web = server(port, WATASU_POOL_ENABLED="false")
        processes.append(web)
        placed = spread(port, key, args.creates)
        counts = [placed.get(local.name, 0), placed.get("bench-w", 0)]
        skew = abs(counts[0] - counts[1]) / max(1, sum(counts))
        print(
            f"{args.creates} creates over 2 hosts: {counts[0]} / {counts[1]}, "
            f"skew {skew * 100:.1f} % (target <= 10 %)"
        )
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                if process.args == [str(ROOT / "scripts" / "run-host")]:  # the script and its workers
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        driver = driver_for(local)
        for name in driver.list_domains(settings.RUNTIME_VM_PREFIX):
            driver.destroy(name)
        Sandbox.objects.all().delete()
        PooledVm.objects.all().delete()
        Host.objects.filter(pk=local.pk).update(state=HostState.UP)


if __name__ == "__main__":
    main()
