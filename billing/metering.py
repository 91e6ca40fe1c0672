"""Metering: usage intervals from the lifecycle, usage records per window, ledger debits.

Intervals are opened and closed by the services that change what a team holds, inside
their transactions (`interval_open` / `interval_close`, and `sandbox_moved` for state
transitions). Boundaries are whole seconds, rounded down, so two intervals of one subject
never share a second.

The meter bills closed windows in order. A window is one transaction under the meter's
row lock: its usage records (unique per line item, subject and window), one debit per
team, the balances; then the cursor moves past it. Two workers running the meter at once
serialise on the lock and the second finds the window done; a worker killed mid-window
leaves nothing behind, and the next pass bills the window whole.

Rounding: within an uninterrupted period of a subject (windows in a row), the charge up
to any window's end is the exact price of the quantity so far, rounded half up to the
micro-euro; each window bills the difference. So a period is never off by more than half
a micro-euro, however many windows it spans. (A 512 MiB sandbox is 1 µ€ per second of
memory and a vCPU 10 µ€ per second: runtime at whole MiB multiples of 512 is exact.)
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, OuterRef, Q, Subquery, Sum
from django.utils import timezone

from billing.models import (
    Account,
    EntryKind,
    IntervalKind,
    LedgerEntry,
    LineItem,
    Meter,
    MeterCursor,
    UsageInterval,
    UsageRecord,
)

SECONDS_PER_MONTH = 30 * 86400
MICROS = 1_000_000
BATCH = 2000
# A pass catches up at most this many windows per meter (the sweep queues itself again).
WINDOWS_PER_PASS = 120

STORAGE_KINDS = {
    IntervalKind.STOPPED_DISK: LineItem.STOPPED_DISK,
    IntervalKind.CHECKPOINT: LineItem.CHECKPOINT,
    IntervalKind.TEMPLATE: LineItem.TEMPLATE,
    IntervalKind.VOLUME: LineItem.VOLUME,
}
# Intervals of VMs, and the (vCPU, memory) line items each yields.
COMPUTE_KINDS = {
    IntervalKind.RUNTIME: (LineItem.VCPU, LineItem.MEMORY),
    IntervalKind.BUILD: (LineItem.BUILD_VCPU, LineItem.BUILD_MEMORY),
}
UNITS = {
    LineItem.VCPU: "vcpu_second",
    LineItem.MEMORY: "mib_second",
    LineItem.BUILD_VCPU: "vcpu_second",
    LineItem.BUILD_MEMORY: "mib_second",
    LineItem.STOPPED_DISK: "byte_second",
    LineItem.CHECKPOINT: "byte_second",
    LineItem.TEMPLATE: "byte_second",
    LineItem.VOLUME: "byte_second",
}


def micros(euros: Decimal | None) -> int:
    """Euros (a settings value) as micro-euros; the settings have at most 6 decimals."""
    return int((euros or Decimal(0)) * MICROS)


def unit_price(line_item: str) -> Fraction:
    """Micro-euros per unit of quantity (see `UNITS`), exactly."""
    monthly = {
        LineItem.STOPPED_DISK: settings.PRICE_STOPPED_DISK_GIB_MONTH,
        LineItem.CHECKPOINT: settings.PRICE_CHECKPOINT_GIB_MONTH,
        LineItem.TEMPLATE: settings.PRICE_TEMPLATE_GIB_MONTH,
        LineItem.VOLUME: settings.PRICE_VOLUME_GIB_MONTH,
    }
    if line_item in (LineItem.VCPU, LineItem.BUILD_VCPU):
        return Fraction(settings.PRICE_VCPU_SECOND or 0) * MICROS
    if line_item in (LineItem.MEMORY, LineItem.BUILD_MEMORY):
        return Fraction(settings.PRICE_MEMORY_GIB_SECOND or 0) * MICROS / 1024
    price = monthly[LineItem(line_item)]
    return Fraction(price or 0) * MICROS / (2**30 * SECONDS_PER_MONTH)


def price(quantity: int, unit: Fraction) -> int:
    """`quantity` units at `unit` µ€ each, rounded half up to the micro-euro."""
    exact = quantity * unit
    return int((exact + Fraction(1, 2)).__floor__())


def second(at: datetime) -> datetime:
    return at.replace(microsecond=0)


# --- intervals (called by the lifecycle, inside its transactions) -------------------------


def _watermark(kind: str) -> datetime | None:
    meter = Meter.RUNTIME if kind in COMPUTE_KINDS else Meter.STORAGE
    return MeterCursor.objects.filter(meter=meter).values_list("metered_until", flat=True).first()


def _not_before_metered(kind: str, at: datetime) -> datetime:
    """A boundary that commits after its window was billed lands at the window's end:
    a second already billed is never billed again nor refunded (only a transition that
    commits more than BILLING_SETTLE_SECONDS late can meet this)."""
    mark = _watermark(kind)
    return max(at, mark) if mark is not None else at


def interval_open(
    *, team_id: int, kind: str, subject_id: int, at: datetime, cpu: int = 0, memory_mb: int = 0, size: int = 0
) -> None:
    """Start billing `subject_id` for `kind` at `at` (no-op if it is already open)."""
    if UsageInterval.objects.filter(kind=kind, subject_id=subject_id, ended_at__isnull=True).exists():
        return
    UsageInterval.objects.create(
        team_id=team_id,
        kind=kind,
        subject_id=subject_id,
        cpu_count=cpu,
        memory_mb=memory_mb,
        size_bytes=size,
        started_at=_not_before_metered(kind, second(at)),
    )


def intervals_close(*, kind: str, subject_ids: Iterable[int], at: datetime) -> int:
    """Stop billing these subjects for `kind` at `at` (those without an open interval: no-op)."""
    ids = list(subject_ids)
    if not ids:
        return 0
    end = _not_before_metered(kind, second(at))
    rows = UsageInterval.objects.filter(kind=kind, subject_id__in=ids, ended_at__isnull=True)
    # An interval opened in the same second closes empty rather than before its start.
    closed = rows.filter(started_at__lte=end).update(ended_at=end)
    return closed + rows.update(ended_at=F("started_at"))


def interval_close(*, kind: str, subject_id: int, at: datetime) -> None:
    intervals_close(kind=kind, subject_ids=[subject_id], at=at)


# --- the meter -------------------------------------------------------------------------------


def window_seconds(meter: str) -> int:
    if meter == Meter.RUNTIME:
        return settings.BILLING_RUNTIME_WINDOW_SECONDS
    return settings.BILLING_STORAGE_WINDOW_SECONDS


def _align(at: datetime, seconds: int) -> datetime:
    epoch = int(at.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=UTC)


def _kinds(meter: str) -> list[str]:
    return list(COMPUTE_KINDS) if meter == Meter.RUNTIME else list(STORAGE_KINDS)


def _cursor(meter: str, now: datetime) -> MeterCursor:
    """The meter's cursor, created at the start of the earliest interval it must bill."""
    cursor = MeterCursor.objects.filter(meter=meter).first()
    if cursor is not None:
        return cursor
    first = UsageInterval.objects.filter(kind__in=_kinds(meter)).order_by("started_at").first()
    start = _align(min(first.started_at, now) if first else now, window_seconds(meter))
    MeterCursor.objects.get_or_create(meter=meter, defaults={"metered_until": start})
    return MeterCursor.objects.get(meter=meter)


@dataclasses.dataclass(frozen=True)
class Window:
    meter: str
    start: datetime
    end: datetime

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())


def meter_run(*, now: datetime | None = None, max_windows: int = WINDOWS_PER_PASS) -> dict[str, Any]:
    """Bill every window of both meters that ended BILLING_SETTLE_SECONDS before `now`."""
    now = now or timezone.now()
    settled = now - timedelta(seconds=settings.BILLING_SETTLE_SECONDS)
    result: dict[str, Any] = {"windows": 0, "records": 0, "more": False}
    for meter in (Meter.RUNTIME, Meter.STORAGE):
        length = timedelta(seconds=window_seconds(meter))
        for _ in range(max_windows):
            start = _cursor(meter, now).metered_until
            if start + length > settled:
                break
            records = window_bill(Window(meter, start, start + length))
            if records is not None:
                result["windows"] += 1
                result["records"] += records
        else:
            result["more"] = True
    return result


def _quantities(window: Window) -> dict[tuple[str, int], list[int]]:
    """(line item, subject) -> [team, quantity] for every interval overlapping the window."""
    found: dict[tuple[str, int], list[int]] = {}
    overlapping = UsageInterval.objects.filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=window.start),
        kind__in=_kinds(window.meter),
        started_at__lt=window.end,
    ).values_list(
        "team_id", "kind", "subject_id", "cpu_count", "memory_mb", "size_bytes", "started_at", "ended_at"
    )
    for team_id, kind, subject_id, cpu, memory_mb, size, started, ended in overlapping.iterator(
        chunk_size=BATCH
    ):
        start = max(started, window.start)
        end = min(ended, window.end) if ended is not None else window.end
        seconds = int((end - start).total_seconds())
        if seconds <= 0:
            continue
        if kind in COMPUTE_KINDS:
            vcpu, memory = COMPUTE_KINDS[IntervalKind(kind)]
            amounts = [(vcpu, cpu * seconds), (memory, memory_mb * seconds)]
        else:
            amounts = [(STORAGE_KINDS[IntervalKind(kind)], size * seconds)]
        for line_item, quantity in amounts:
            entry = found.setdefault((line_item, subject_id), [team_id, 0])
            entry[1] += quantity
    return found


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for index in range(0, len(items), size):
        yield items[index : index + size]


def _records(window: Window, quantities: dict[tuple[str, int], list[int]]) -> Iterator[UsageRecord]:
    """Priced records, a batch at a time: one query per batch finds each subject's record
    of the window before (its period so far)."""
    units = {item: unit_price(item) for item in LineItem.values}
    previous_start = window.start - timedelta(seconds=window.seconds)
    for batch in _chunks(sorted(quantities), BATCH):
        by_item: dict[str, list[int]] = defaultdict(list)
        for line_item, subject_id in batch:
            by_item[line_item].append(subject_id)
        wanted = Q()
        for line_item, subjects in by_item.items():
            wanted |= Q(line_item=line_item, subject_id__in=subjects)
        before = dict(
            ((item, subject), cumulative)
            for item, subject, cumulative in UsageRecord.objects.filter(
                wanted, window_start=previous_start
            ).values_list("line_item", "subject_id", "cumulative")
        )
        for key in batch:
            team_id, quantity = quantities[key]
            so_far = before.get(key, 0)
            unit = units[key[0]]
            yield UsageRecord(
                team_id=team_id,
                line_item=key[0],
                subject_id=key[1],
                window_start=window.start,
                window_end=window.end,
                quantity=quantity,
                cumulative=so_far + quantity,
                amount_micros=price(so_far + quantity, unit) - price(so_far, unit),
            )


def window_bill(window: Window) -> int | None:
    """Bill one window (see the module docstring). None if another worker billed it first."""
    with transaction.atomic():
        cursor = MeterCursor.objects.select_for_update().get(meter=window.meter)
        if cursor.metered_until != window.start:
            return None
        quantities = _quantities(window)
        totals: dict[int, int] = defaultdict(int)
        count = 0
        pending: list[UsageRecord] = []
        for record in _records(window, quantities):
            totals[record.team_id] += record.amount_micros
            pending.append(record)
            if len(pending) >= BATCH:
                UsageRecord.objects.bulk_create(pending)
                count += len(pending)
                pending = []
        UsageRecord.objects.bulk_create(pending)
        count += len(pending)
        _debit(window, {team: amount for team, amount in totals.items() if amount})
        cursor.metered_until = window.end
        cursor.save(update_fields=["metered_until", "updated_at"])
    return count


def _debit(window: Window, totals: dict[int, int]) -> None:
    """One usage debit per team, the balances, and the waivers below the negative floor."""
    if not totals:
        return
    from billing.services import accounts_ensure

    accounts_ensure(team_ids=list(totals))
    reason = f"{window.meter} usage {window.start:%Y-%m-%d %H:%M}-{window.end:%H:%M} UTC"
    _post_window(window, EntryKind.USAGE, {team: -amount for team, amount in totals.items()}, reason)
    if settings.BILLING_ENFORCE:
        _waive_below_floor(window, totals)


def _post_window(window: Window, kind: str, amounts: dict[int, int], reason: str) -> None:
    """One `kind` entry of the window per team (`amounts`: signed µ€) and the cached balances
    moved by them, in one statement each."""
    LedgerEntry.objects.bulk_create(
        LedgerEntry(
            team_id=team_id,
            kind=kind,
            amount_micros=amount,
            at=window.end,
            meter=window.meter,
            window_start=window.start,
            reason=reason,
        )
        for team_id, amount in amounts.items()
    )
    moved = (
        LedgerEntry.objects.filter(
            meter=window.meter, window_start=window.start, kind=kind, team_id=OuterRef("team_id")
        )
        .values("team_id")
        .annotate(total=Sum("amount_micros"))
        .values("total")
    )
    Account.objects.filter(team_id__in=list(amounts)).update(
        balance_micros=F("balance_micros") + Subquery(moved)
    )


def _waive_below_floor(window: Window, totals: dict[int, int]) -> None:
    """Of this window's usage, the part that took a balance below the floor is waived: never
    more than the window's usage (debts from refunds or chargebacks stand)."""
    floor = micros(settings.BILLING_NEGATIVE_FLOOR)
    # Locked: a top-up landing meanwhile must not be waived away.
    below = dict(
        Account.objects.select_for_update()
        .filter(team_id__in=list(totals), balance_micros__lt=floor)
        .order_by("pk")
        .values_list("team_id", "balance_micros")
    )
    waived = {team_id: min(totals[team_id], floor - balance) for team_id, balance in below.items()}
    waived = {team_id: amount for team_id, amount in waived.items() if amount > 0}
    if waived:
        reason = f"usage below the negative floor ({settings.BILLING_NEGATIVE_FLOOR}) is not charged"
        _post_window(window, EntryKind.WAIVER, waived, reason)


# --- the sandbox lifecycle's hooks ------------------------------------------------------------

# States whose sandbox keeps a root disk on the host (until purged): the stopped-disk item.
KEPT_DISK_STATES = frozenset({"stopped", "failed", "expired", "lost"})


def sandboxes_moved(
    *, moves: list[tuple[int, str]], to_state: str, at: datetime, disk_bytes: dict[int, int] | None = None
) -> None:
    """Intervals for state transitions ``(sandbox id, from state) -> to_state`` at `at`:
    entering a runtime state opens runtime (and ends a kept disk), leaving one ends it; a
    sandbox that stops, fails, expires or is lost with its disk kept opens the disk's."""
    from sandboxes.models import RUNTIME_STATES, Sandbox

    if not moves:
        return
    ids = [pk for pk, _ in moves]
    running_before = [pk for pk, state in moves if state in RUNTIME_STATES]
    if to_state in RUNTIME_STATES:
        starting = [pk for pk, state in moves if state not in RUNTIME_STATES]
        intervals_close(kind=IntervalKind.STOPPED_DISK, subject_ids=starting, at=at)
        for pk, team_id, cpu, memory_mb in Sandbox.objects.filter(pk__in=starting).values_list(
            "pk", "team_id", "cpu_count", "memory_mb"
        ):
            interval_open(
                team_id=team_id, kind=IntervalKind.RUNTIME, subject_id=pk, at=at, cpu=cpu, memory_mb=memory_mb
            )
        return
    intervals_close(kind=IntervalKind.RUNTIME, subject_ids=running_before, at=at)
    if to_state not in KEPT_DISK_STATES:
        intervals_close(kind=IntervalKind.STOPPED_DISK, subject_ids=ids, at=at)
        return
    sizes = disk_bytes or {}
    kept = Sandbox.objects.filter(pk__in=ids, purged_at__isnull=True).values_list("pk", "team_id")
    for pk, team_id in kept:
        interval_open(
            team_id=team_id, kind=IntervalKind.STOPPED_DISK, subject_id=pk, at=at, size=sizes.get(pk, 0)
        )


def sandboxes_purged(*, ids: list[int], at: datetime) -> None:
    """Their disks are gone: no more stopped-disk charges."""
    intervals_close(kind=IntervalKind.STOPPED_DISK, subject_ids=ids, at=at)


def template_versions_ready(*, versions: list[tuple[int, int | None, int]], at: datetime) -> None:
    """Ready template versions ``(id, team id, size)``: their storage is billed to the
    template's team (provider templates, with no team, are the platform's)."""
    for version_id, team_id, size in versions:
        if team_id is not None:
            interval_open(
                team_id=team_id, kind=IntervalKind.TEMPLATE, subject_id=version_id, at=at, size=size
            )


def template_versions_retired(*, ids: list[int], at: datetime) -> None:
    intervals_close(kind=IntervalKind.TEMPLATE, subject_ids=ids, at=at)


def build_started(*, version_id: int, team_id: int | None, cpu: int, memory_mb: int, at: datetime) -> None:
    """A team template's build VM runs from now (provider templates' builds are the platform's)."""
    if team_id is not None:
        interval_open(
            team_id=team_id,
            kind=IntervalKind.BUILD,
            subject_id=version_id,
            at=at,
            cpu=cpu,
            memory_mb=memory_mb,
        )


def build_ended(*, version_id: int, at: datetime) -> None:
    intervals_close(kind=IntervalKind.BUILD, subject_ids=[version_id], at=at)
