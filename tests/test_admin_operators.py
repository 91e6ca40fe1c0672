"""The operator's admin: hosts with capacity and use, draining, and teams with quotas, members,
balance and suspension, each list one query whatever its length."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext

from billing import services as billing
from billing.models import Account
from sandboxes.models import Host, HostState, SandboxState
from sandboxes.placement import host_has_room, host_place
from teams.models import Role, Team
from tests.factories import HostFactory, MembershipFactory, SandboxFactory, TeamFactory
from watasu import errors

pytestmark = pytest.mark.django_db

HOSTS = "/admin/sandboxes/host/"
TEAMS = "/admin/teams/team/"


@pytest.fixture
def operator(django_user_model) -> Client:  # type: ignore[no-untyped-def]
    user = django_user_model.objects.create_superuser(email="ops@example.com", password="x")
    client = Client()
    client.force_login(user)
    return client


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


# --- hosts ---------------------------------------------------------------------------------


def test_hosts_show_capacity_use_and_a_link_to_their_sandboxes(operator: Client) -> None:
    # given a host with two runtime sandboxes, a stopped one and a destroyed one
    host = HostFactory(name="h1", cpu_capacity=16, memory_capacity_mb=32768)
    team = TeamFactory()
    SandboxFactory(team=team, host=host, state=SandboxState.READY, cpu_count=2, memory_mb=1024)
    SandboxFactory(team=team, host=host, state=SandboxState.CREATING, cpu_count=4, memory_mb=4096)
    SandboxFactory(team=team, host=host, state=SandboxState.STOPPED, cpu_count=8, memory_mb=8192)
    SandboxFactory(team=team, host=host, state=SandboxState.DESTROYED, cpu_count=8, memory_mb=8192)
    elsewhere = SandboxFactory(team=team, host=HostFactory(), state=SandboxState.READY)

    # when the operator lists the hosts
    page = operator.get(HOSTS).content.decode()

    # then the runtime sandboxes' use is shown against the capacity, and their count
    assert '<td class="field-cpu">6 / 16</td>' in page
    assert '<td class="field-memory">5120 / 32768</td>' in page
    assert '<td class="field-running_sandboxes">2</td>' in page
    assert '<td class="field-stopped_sandboxes">1</td>' in page
    link = f'/admin/sandboxes/sandbox/?host__id__exact={host.pk}">Sandboxes on h1</a>'
    assert link in page
    # and the link lists that host's sandboxes only
    listed = operator.get(f"/admin/sandboxes/sandbox/?host__id__exact={host.pk}").content.decode()
    assert listed.count('class="action-select"') == 4
    assert f"/admin/sandboxes/sandbox/{elsewhere.pk}/change/" not in listed
    # the change page links there too
    assert link in operator.get(f"{HOSTS}{host.pk}/change/").content.decode()


def test_the_host_list_is_one_query_for_3_or_30_hosts(operator: Client) -> None:
    team = TeamFactory()

    def hosts(count: int) -> None:
        for _ in range(count - Host.objects.count()):
            host = HostFactory()
            SandboxFactory(team=team, host=host, state=SandboxState.READY)
            SandboxFactory(team=team, host=host, state=SandboxState.STOPPED)

    hosts(3)
    few = _queries(operator, HOSTS)
    hosts(30)
    assert _queries(operator, HOSTS) == few
    assert operator.get(HOSTS).content.decode().count('<td class="field-running_sandboxes">1</td>') == 30


def _act(client: Client, action: str, *hosts: Host) -> str:
    response = client.post(HOSTS, {"action": action, "_selected_action": [h.pk for h in hosts]}, follow=True)
    assert response.status_code == 200
    return response.content.decode()


def test_a_drained_host_gets_no_new_sandboxes_until_undrained(operator: Client) -> None:
    # given two up hosts, the roomier one is where placement goes
    roomy = HostFactory(name="roomy", memory_capacity_mb=65536)
    small = HostFactory(name="small", memory_capacity_mb=8192)
    with transaction.atomic():
        assert host_place(cpu=1, memory_mb=512) == roomy

    # when the operator drains the roomy host
    assert "Drained 1 host(s)" in _act(operator, "drain_hosts", roomy)

    # then it is draining and placement picks the other one; its sandboxes stay
    assert Host.objects.get(pk=roomy.pk).state == HostState.DRAINING
    with transaction.atomic():
        assert host_place(cpu=1, memory_mb=512) == small
    # and with both drained, nothing is placed at all
    _act(operator, "drain_hosts", small)
    with transaction.atomic(), pytest.raises(errors.Unavailable) as refused:
        host_place(cpu=1, memory_mb=512)
    assert "every host is drained or down" in refused.value.message  # not "retry later"
    # but a sandbox kept on a drained host may come back there (it is not a new placement)
    assert host_has_room(host=roomy, cpu=1, memory_mb=512)

    # when the roomy one is undrained, placement uses it again
    assert "Undrained 1 host(s)" in _act(operator, "undrain_hosts", roomy)
    assert Host.objects.get(pk=roomy.pk).state == HostState.UP
    with transaction.atomic():
        assert host_place(cpu=1, memory_mb=512) == roomy


def test_draining_leaves_a_down_host_down(operator: Client) -> None:
    down = HostFactory(state=HostState.DOWN)
    assert "Drained 0 host(s)" in _act(operator, "drain_hosts", down)
    assert "Undrained 0 host(s)" in _act(operator, "undrain_hosts", down)
    assert Host.objects.get(pk=down.pk).state == HostState.DOWN


def test_only_staff_reach_the_host_admin(owner) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(owner.user)
    response = client.post(HOSTS, {"action": "drain_hosts", "_selected_action": [HostFactory().pk]})
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    assert not Host.objects.filter(state=HostState.DRAINING).exists()


# --- teams ---------------------------------------------------------------------------------


def test_teams_show_members_balance_and_suspension(operator: Client) -> None:
    # given acme with 3 members and 12.5 € of credit, and a suspended team without credit
    acme = TeamFactory(slug="acme")
    for role in (Role.OWNER, Role.MEMBER, Role.VIEWER):
        MembershipFactory(team=acme, role=role)
    billing.credit_grant(team=acme, amount=Decimal("12.5"), reason="trial", by=None)
    broke = TeamFactory(slug="broke")
    billing.account_of(broke)
    Account.objects.filter(team=broke).update(balance_micros=-250_000, suspended_at="2026-11-02T00:00:00Z")
    TeamFactory(slug="fresh")  # never had an account

    page = operator.get(f"{TEAMS}?o=1").content.decode()
    rows = {slug: page[page.index(f">{slug}</a>") :].split("</tr>")[0] for slug in ("acme", "broke", "fresh")}
    assert '<td class="field-members">3</td>' in rows["acme"]
    assert '<td class="field-balance">12.500000</td>' in rows["acme"]
    assert 'alt="False"' in rows["acme"].split('field-suspended">')[1].split("</td>")[0]
    assert '<td class="field-balance">-0.250000</td>' in rows["broke"]
    assert 'alt="True"' in rows["broke"].split('field-suspended">')[1].split("</td>")[0]
    assert '<td class="field-balance">-</td>' in rows["fresh"]


def test_the_team_list_is_one_query_for_3_or_30_teams(operator: Client) -> None:
    def teams(count: int) -> None:
        for _ in range(count - Team.objects.count()):
            team = TeamFactory()
            MembershipFactory(team=team)
            billing.account_of(team)

    teams(3)
    few = _queries(operator, TEAMS)
    teams(30)
    assert _queries(operator, TEAMS) == few


def test_quotas_are_edited_in_the_team_list(operator: Client) -> None:
    acme = TeamFactory(slug="acme")
    response = operator.post(
        f"{TEAMS}?q=acme",
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(acme.pk),
            "form-0-max_running_instances": "5",
            "form-0-max_vcpu_count": "10",
            "form-0-max_memory_mb": "20480",
            "_save": "Save",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    acme.refresh_from_db()
    assert (acme.max_running_instances, acme.max_vcpu_count, acme.max_memory_mb) == (5, 10, 20480)
