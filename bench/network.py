"""Network policy benchmark: what enforcement costs a guest, and how fast a change applies.

    make bench-network     (or: .venv/bin/python bench/network.py [--runs 200] [--mib 16] [--rounds 3])

Servers in a network namespace on this machine (tests/netlab.py), one sandbox, its policy
switched through the service `PUT /network` calls; each figure is the median of --rounds
rounds taken over the policies in turn. In one run:
  1. TCP connect latency to a raw port (p50 of --runs connects from the guest, decided by
     address), an HTTP GET by name (p50; through the proxy under a name policy) and a
     --mib MiB HTTP download by name, under: the default policy (everything allowed: one nftables accept), a
     CIDR policy (allowlist of 64 networks, deny rules in front: still nftables only), and
     a name policy (the allowed host matched by its Host header, so through the egress
     proxy). Targets: CIDR path >= 90 % of the default's throughput and <= 1 ms added
     connect; the name path is reported against the same baseline (a user-space hop);
  2. `PUT /network` to enforcement: the service call's duration (the rule is in force
     when it returns) and, right after, the first connect of the guest refused.
Uses PostgreSQL database `watasu_bench` (created when missing) and its own data directory.
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import time

from common import ms, percentile, prepare_database, use_bench_environment

ROOT = use_bench_environment()

GUEST = r"""
import json, socket, sys, time, urllib.request
target, runs, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
host, port = target.split(":")
times = []
for _ in range(runs):
    t = time.perf_counter()
    s = socket.create_connection((host, int(port)), timeout=5)
    times.append(time.perf_counter() - t)
    s.close()
requests = []
for _ in range(max(runs // 4, 10)):
    t = time.perf_counter()
    urllib.request.urlopen("http://gamma.test/echo", timeout=10).read()
    requests.append(time.perf_counter() - t)
t = time.perf_counter()
size = len(urllib.request.urlopen(f"http://gamma.test/bytes?n={mib << 20}", timeout=120).read())
print(json.dumps({"connect": times, "request": requests, "seconds": time.perf_counter() - t, "bytes": size}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    prepare_database(ROOT)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from sandboxes import services
    from sandboxes.api.requests import network_policy_of
    from sandboxes.models import Sandbox
    from sandboxes.runtime import vm
    from sandboxes.specs import CreateSpec
    from teams.models import User
    from templates_app.services import base_template_ensure
    from tests.netlab import NetLab

    with NetLab() as lab:
        settings.EGRESS_RESOLVERS = [lab.resolver]
        host = services.host_register_local()
        base_template_ensure(host=host)
        team = f"bench-{secrets.token_hex(3)}"
        call_command(
            "create_api_key", email=f"{team}@example.com", team=team, scope="write", stdout=io.StringIO()
        )
        user = User.objects.get(email=f"{team}@example.com")
        sandbox, _ = services.sandbox_create(user=user, spec=CreateSpec(team=team, timeout=3600))
        try:
            client = vm.agent_client(Sandbox.objects.get(pk=sandbox.pk))
            client.exec(f"cat > /root/bench.py <<'EOF'\n{GUEST}\nEOF", timeout=60)

            def put(policy: dict[str, object]) -> float:
                shown, headers = network_policy_of(policy)
                started = time.perf_counter()
                services.sandbox_set_network(
                    sandbox=Sandbox.objects.get(pk=sandbox.pk), policy=shown, headers=headers
                )
                return time.perf_counter() - started

            def measure() -> dict[str, float]:
                result = client.exec(
                    f"python3 /root/bench.py {lab.addresses[2]}:7000 {args.runs} {args.mib}", timeout=600
                )
                assert result["exit_code"] == 0, result
                data = json.loads(result["stdout"])
                assert data["bytes"] == args.mib << 20, data
                return {
                    "connect": percentile(data["connect"], 0.5),
                    "request": percentile(data["request"], 0.5),
                    "mibps": args.mib / data["seconds"],
                }

            networks = [f"203.0.{i}.0/24" for i in range(63)] + ["198.18.0.0/24"]
            policies = {
                "default (all allowed)": {},
                "CIDR allowlist (64 nets)": {
                    "allow_internet_access": False,
                    "allow_out": networks,
                    "deny_out": [f"192.0.2.{i}" for i in range(16)],
                },
                "name rule (egress proxy)": {
                    "allow_internet_access": False,
                    "allow_out": ["gamma.test", f"{lab.addresses[2]}:7000"],
                },
            }
            # rounds over the policies in turn, so that drift of the machine hits them alike
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in policies}
            for round_ in range(args.rounds + 1):
                for name, policy in policies.items():
                    put(policy)
                    sample = measure()
                    if round_:  # the first round warms DNS and the server's page cache
                        samples[name].append(sample)
            results = {
                name: {key: percentile([s[key] for s in runs], 0.5) for key in runs[0]}
                for name, runs in samples.items()
            }
            base = results["default (all allowed)"]
            for name, result in results.items():
                print(
                    f"{name:27s} TCP connect p50 {result['connect'] * 1000:5.2f} ms "
                    f"(+{(result['connect'] - base['connect']) * 1000:5.2f})   "
                    f"HTTP GET p50 {result['request'] * 1000:6.2f} ms "
                    f"(+{(result['request'] - base['request']) * 1000:5.2f})   "
                    f"download {result['mibps']:6.1f} MiB/s ({result['mibps'] / base['mibps'] * 100:5.1f} %)"
                )

            # PUT -> enforcement: alternate allow/deny of one address; the first connect after
            # each PUT must already have the new verdict
            target = lab.addresses[0]
            check = (
                'python3 -c "import socket; s=socket.socket(); s.settimeout(3); '
                f"print(s.connect_ex(('{target}', 7000)))\""
            )
            durations, wrong = [], 0
            for index in range(20):
                deny = index % 2 == 0
                durations.append(put({"deny_out": [target]} if deny else {}))
                answer = client.exec(check, timeout=30)["stdout"].strip()
                wrong += (answer == "0") == deny
            print(
                f"PUT /network to enforced:    {ms(durations)}   max {max(durations) * 1000:.1f} ms; "
                f"first connect after it with the new verdict: {20 - wrong}/20"
            )
        finally:
            services.sandbox_destroy(sandbox=Sandbox.objects.get(pk=sandbox.pk))


if __name__ == "__main__":
    main()
