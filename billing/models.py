"""Billing: usage intervals, metered usage records, the ledger, balances, top-ups.

Money is integer micro-euros everywhere (``*_micros``), never floats. The ledger is
the truth: a team's balance is the sum of its entries, cached on its `Account` and
moved only together with the entry that explains it (same transaction, `F()`).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from teams.models import Team


class IntervalKind(models.TextChoices):
    """What an interval measures; its subject is named by `subject_id`."""

    RUNTIME = "runtime"  # a sandbox holding vCPUs and memory (subject: the sandbox)
    BUILD = "build"  # a template build's VM (subject: the template version)
    STOPPED_DISK = "stopped_disk"  # a stopped/failed/expired/lost sandbox's kept root disk
    CHECKPOINT = "checkpoint"  # a ready checkpoint's artifact
    TEMPLATE = "template"  # a ready template version's disk
    VOLUME = "volume"  # a volume's provisioned size


class LineItem(models.TextChoices):
    """The billed line items (a runtime or build interval yields two: vCPU and memory)."""

    VCPU = "vcpu"
    MEMORY = "memory"
    BUILD_VCPU = "build_vcpu"  # a template build's VM, at the runtime prices
    BUILD_MEMORY = "build_memory"
    STOPPED_DISK = "stopped_disk"
    CHECKPOINT = "checkpoint"
    TEMPLATE = "template"
    VOLUME = "volume"


class Meter(models.TextChoices):
    """Runtime is metered in short windows (the balance follows it within a minute),
    storage in long ones (it changes slowly; fewer records)."""

    RUNTIME = "runtime"
    STORAGE = "storage"


class UsageInterval(models.Model):
    """A period during which a subject used something billable, opened and closed by
    the lifecycle (state transitions, checkpoint/volume/template creation and deletion)
    in the transaction that makes the change. Boundaries are whole seconds."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="usage_intervals")
    kind = models.CharField(max_length=16, choices=IntervalKind.choices)
    subject_id = models.BigIntegerField()
    cpu_count = models.PositiveSmallIntegerField(default=0)
    memory_mb = models.PositiveIntegerField(default=0)
    size_bytes = models.BigIntegerField(default=0)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # One open interval per subject and kind: a second open is a bug, not a double charge.
            models.UniqueConstraint(
                fields=["kind", "subject_id"], condition=Q(ended_at__isnull=True), name="interval_one_open"
            ),
        ]
        indexes = [
            models.Index(fields=["kind", "ended_at"], name="interval_kind_ended"),
            models.Index(fields=["kind", "subject_id"], name="interval_subject"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.subject_id} from {self.started_at} to {self.ended_at or '…'}"


class UsageRecord(models.Model):
    """What one subject used of one line item in one metering window, and its price.

    The unique (line item, subject, window) constraint means a window is billed once,
    whatever runs twice. `cumulative` is the subject's quantity since the start of its
    uninterrupted period (windows in a row), so rounding never drifts (see `metering`).
    """

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="usage_records")
    line_item = models.CharField(max_length=16, choices=LineItem.choices)
    subject_id = models.BigIntegerField()
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    quantity = models.BigIntegerField(help_text="vCPU-seconds, MiB-seconds or byte-seconds")
    cumulative = models.BigIntegerField()
    amount_micros = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["line_item", "subject_id", "window_start"], name="usage_once_per_window"
            ),
        ]
        indexes = [models.Index(fields=["team", "window_start"], name="usage_team_window")]

    def __str__(self) -> str:
        return f"{self.line_item} {self.subject_id} @ {self.window_start}: {self.amount_micros} µ€"


class MeterCursor(models.Model):
    """How far a meter has billed: every window before `metered_until` is in the ledger."""

    meter = models.CharField(max_length=16, choices=Meter.choices, unique=True)
    metered_until = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.meter} metered until {self.metered_until}"


class Account(models.Model):
    """A team's billing state: the cached balance, suspension, alerts, Stripe customer."""

    # A team without ledger entries may be deleted (its account goes with it); the ledger
    # protects a team through which money moved.
    team = models.OneToOneField(Team, on_delete=models.CASCADE, related_name="billing_account")
    balance_micros = models.BigIntegerField(default=0)
    stripe_customer_id = models.CharField(max_length=64, blank=True)
    # When the balance last fell to zero or below (cleared when it is positive again).
    exhausted_at = models.DateTimeField(null=True, blank=True)
    suspended_at = models.DateTimeField(null=True, blank=True, db_index=True)
    low_balance_notified_at = models.DateTimeField(null=True, blank=True)
    # The team's own monthly spend alert, and the month (its first day) it last fired for.
    spend_alert_micros = models.BigIntegerField(null=True, blank=True)
    spend_alert_notified_for = models.DateField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"account of {self.team_id}: {self.balance_micros} µ€"


class EntryKind(models.TextChoices):
    USAGE = "usage"  # debit: one metering window's usage records of the team
    WAIVER = "waiver"  # credit: usage below the negative floor, not charged
    TOP_UP = "top_up"  # credit: a Stripe payment that succeeded
    GRANT = "grant"  # credit (or debit): an operator's, with a reason
    REFUND = "refund"  # debit: money returned to the card
    DISPUTE = "dispute"  # debit: a chargeback opened
    DISPUTE_WON = "dispute_won"  # credit: a chargeback decided in our favour


class LedgerEntry(models.Model):
    """One movement of a team's balance. Entries are never changed or deleted."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="ledger_entries")
    kind = models.CharField(max_length=16, choices=EntryKind.choices)
    amount_micros = models.BigIntegerField(help_text="positive credits, negative debits")
    at = models.DateTimeField(db_index=True)
    meter = models.CharField(max_length=16, choices=Meter.choices, blank=True)
    window_start = models.DateTimeField(null=True, blank=True)
    top_up = models.ForeignKey(
        "TopUp", null=True, blank=True, on_delete=models.PROTECT, related_name="entries"
    )
    # The external fact this entry accounts for (a refund or dispute id): once each.
    reference = models.CharField(max_length=128, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        verbose_name_plural = "ledger entries"
        constraints = [
            models.UniqueConstraint(
                fields=["team", "kind", "meter", "window_start"],
                condition=Q(kind__in=["usage", "waiver"]),
                name="ledger_window_once",
            ),
            models.UniqueConstraint(
                fields=["kind", "top_up"], condition=Q(kind="top_up"), name="ledger_top_up_once"
            ),
            models.UniqueConstraint(
                fields=["reference"], condition=~Q(reference=""), name="ledger_reference_once"
            ),
        ]
        indexes = [models.Index(fields=["team", "-id"], name="ledger_team_newest")]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount_micros} µ€ for {self.team_id}"


class TopUpStatus(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TopUp(models.Model):
    """A prepaid top-up: one Stripe PaymentIntent we created, credited once when it succeeds."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="top_ups")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    amount_micros = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=16, choices=TopUpStatus.choices, default=TopUpStatus.PENDING)
    payment_intent_id = models.CharField(max_length=128, unique=True)
    customer_id = models.CharField(max_length=64)
    refunded_micros = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    succeeded_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["team", "-id"], name="top_up_team_newest")]

    def __str__(self) -> str:
        return f"top-up {self.pk} of {self.team_id} ({self.status})"

    @property
    def receipt_number(self) -> str:
        return f"R-{self.created_at:%Y%m}-{self.pk:06d}"


class StripeEvent(models.Model):
    """A webhook event we handled: each Stripe event id is acted on once."""

    event_id = models.CharField(max_length=128, unique=True)
    type = models.CharField(max_length=100)
    received_at = models.DateTimeField(auto_now_add=True)
    outcome = models.CharField(max_length=300, blank=True)

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"


class Statement(models.Model):
    """A closed month of a team's ledger: opening balance, credits, adjustments, usage by line
    item, waivers, closing balance (= opening + credits + adjustments - usage + waived, the
    ledger's sum at `period_end`, which is the first day of the next month: exclusive).
    Written once the month is fully metered."""

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="statements")
    period_start = models.DateField()
    period_end = models.DateField()
    currency = models.CharField(max_length=3)
    opening_micros = models.BigIntegerField()
    credits_micros = models.BigIntegerField(help_text="top-ups, operator grants, chargebacks won")
    adjustments_micros = models.BigIntegerField(help_text="refunds and chargebacks (negative)")
    usage_micros = models.BigIntegerField()
    waived_micros = models.BigIntegerField()
    closing_micros = models.BigIntegerField()
    lines = models.JSONField(default=list)
    tax_name = models.CharField(max_length=32)
    tax_rate = models.DecimalField(max_digits=6, decimal_places=4)
    tax_included_micros = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "period_start"], name="statement_once")]
        ordering = ["-period_start"]

    def __str__(self) -> str:
        return f"statement {self.period_start:%Y-%m} of {self.team_id}"
