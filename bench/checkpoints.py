"""Checkpoint benchmark: capture time, the guest's pause during it, restore vs cold boot, size.

    make bench-checkpoints     (or: .venv/bin/python bench/checkpoints.py [--runs 5] [--mib 100])

In one run, on one machine:
  1. checkpoint of a running sandbox (guest mode, through the service the API calls) with
     no new data, then after --mib MiB of new random data (target p50 <= 1 s); meanwhile
     a thread runs `true` in the guest over and over: the longest of those calls shows how
     long the guest stalls (it keeps running: no pause, no restart);
  2. the artifact's size against the data written;
  3. restore to usable (a new sandbox on a copy of the checkpoint's disk, cold-booted) vs a
     cold boot of the same template at the same shape (target <= 1.2x), and the memory-
     snapshot create of the template's own shape for scale;
  4. our extension, a checkpoint with memory: its capture (the guest stops meanwhile) and
     its restore to usable, a memory-snapshot start (target p50 <= 1.5 s).
Uses PostgreSQL database `watasu_bench` (created when missing) and its own data directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import secrets
import threading
import time

from common import ms, percentile, prepare_database, use_bench_environment

ROOT = use_bench_environment()


def captures(user, sandbox, runs: int) -> tuple[list[float], list[int], float]:  # type: ignore[no-untyped-def]
    """(seconds per checkpoint, artifact bytes, longest guest call while capturing)."""
    from sandboxes.checkpoints import checkpoint_create, checkpoint_delete
    from sandboxes.models import Sandbox
    from sandboxes.runtime import vm

    client = vm.agent_client(Sandbox.objects.get(pk=sandbox.pk))
    longest, stop = [0.0], threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            client.exec("true", timeout=60)
            longest[0] = max(longest[0], time.perf_counter() - started)

    times, sizes = [], []
    for _ in range(runs):
        sandbox.refresh_from_db()
        stop.clear()
        thread = threading.Thread(target=probe)
        thread.start()
        time.sleep(0.5)
        started = time.perf_counter()
        checkpoint = checkpoint_create(user=user, sandbox=sandbox)
        times.append(time.perf_counter() - started)
        stop.set()
        thread.join()
        sizes.append(checkpoint.size_bytes)
        checkpoint_delete(checkpoint=checkpoint)
    return times, sizes, longest[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=100)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from sandboxes import services
    from sandboxes.checkpoints import checkpoint_create, checkpoint_delete
    from sandboxes.models import Sandbox
    from sandboxes.runtime import vm
    from sandboxes.specs import CreateSpec
    from teams.models import User
    from templates_app.services import base_template_ensure

    host = services.host_register_local()
    version = base_template_ensure(host=host)
    team = f"bench-{secrets.token_hex(3)}"
    call_command(
        "create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=io.StringIO()
    )
    user = User.objects.get(email=f"{team}@example.com")
    spec = CreateSpec(team=team)
    source, _ = services.sandbox_create(user=user, spec=spec)
    made: list[Sandbox] = [source]
    try:
        empty, _, stall_empty = captures(user, source, args.runs)
        print(
            f"checkpoint, no new data:            {ms(empty)}   "
            f"longest guest call {stall_empty * 1000:.0f} ms"
        )
        client = vm.agent_client(Sandbox.objects.get(pk=source.pk))
        result = client.exec(
            f"head -c {args.mib * 2**20} /dev/urandom > /root/bench.bin && sync", timeout=600
        )
        assert result["exit_code"] == 0, result
        full, sizes, stall_full = captures(user, source, args.runs)
        print(
            f"checkpoint, {args.mib} MiB new data:        {ms(full)}   longest guest call "
            f"{stall_full * 1000:.0f} ms (target p50 <= 1000 ms)"
        )
        written = args.mib * 2**20
        print(
            f"artifact size for {args.mib} MiB written:     {sizes[-1] / 2**20:7.1f} MiB "
            f"({sizes[-1] / written:.2f}x the data)"
        )

        source.refresh_from_db()
        kept = checkpoint_create(user=user, sandbox=source)
        # a shape other than the template's baseline cold-boots: the same shape both ways
        shape = dataclasses.replace(spec, memory_mb=version.memory_mb + settings.SANDBOX_MEMORY_INCREMENT_MB)
        restores, cold, snapshot_starts = [], [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            sandbox, _ = services.sandbox_restore(user=user, checkpoint=kept, spec=shape)
            restores.append(time.perf_counter() - started)
            services.sandbox_destroy(sandbox=sandbox)
            started = time.perf_counter()
            sandbox, _ = services.sandbox_create(user=user, spec=shape)
            cold.append(time.perf_counter() - started)
            services.sandbox_destroy(sandbox=sandbox)
            started = time.perf_counter()
            sandbox, _ = services.sandbox_create(user=user, spec=spec)
            snapshot_starts.append(time.perf_counter() - started)
            services.sandbox_destroy(sandbox=sandbox)
        checkpoint_delete(checkpoint=kept)
        ratio = percentile(restores, 0.5) / percentile(cold, 0.5)

        # our extension: with memory, the capture stops the guest, and a restore resumes it
        warm_captures, warm_restores, warm_sizes = [], [], []
        for _ in range(args.runs):
            source.refresh_from_db()
            started = time.perf_counter()
            warm = checkpoint_create(user=user, sandbox=source, include_memory=True)
            warm_captures.append(time.perf_counter() - started)
            warm_sizes.append(warm.size_bytes)
            started = time.perf_counter()
            sandbox, _ = services.sandbox_restore(user=user, checkpoint=warm)
            warm_restores.append(time.perf_counter() - started)
            services.sandbox_destroy(sandbox=sandbox)
            checkpoint_delete(checkpoint=warm)
        print(f"restore to usable ({args.mib} MiB disk):   {ms(restores)}")
        print(f"cold boot, same template and shape:  {ms(cold)}")
        print(f"restore / cold boot at p50:          {ratio:7.2f}x (target <= 1.2x)")
        print(f"memory-snapshot create (baseline):   {ms(snapshot_starts)}")
        print(f"checkpoint with memory (guest stops): {ms(warm_captures)}   {warm_sizes[-1] / 2**20:.0f} MiB")
        print(f"restore with memory to usable:       {ms(warm_restores)} (target p50 <= 1500 ms)")
    finally:
        for sandbox in made:
            services.sandbox_destroy(sandbox=Sandbox.objects.get(pk=sandbox.pk))


if __name__ == "__main__":
    main()
