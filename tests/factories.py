"""factory_boy factories for the models tests need."""

from __future__ import annotations

import factory

from sandboxes.models import Host, Sandbox, SandboxState
from teams.models import Membership, Role, Team, User


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}@example.com")


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team

    slug = factory.Sequence(lambda n: f"team-{n}")
    name = factory.LazyAttribute(lambda team: team.slug.title())


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    team = factory.SubFactory(TeamFactory)
    role = Role.MEMBER


class SandboxFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Sandbox

    team = factory.SubFactory(TeamFactory)
    state = SandboxState.READY
    cpu_count = 2
    memory_mb = 1024
    timeout = 300


class HostFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Host

    name = factory.Sequence(lambda n: f"host-{n}")
    libvirt_uri = "qemu:///system"
    data_dir = "/tmp/watasu-hosts"
    cpu_capacity = 8
    memory_capacity_mb = 8192
