"""Billing endpoints: balance, usage, ledger, top-ups, statements, spend alert, Stripe webhook."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing import selectors, services
from billing.models import LedgerEntry, TopUp
from billing.services import format_micros, month_start
from teams.selectors import team_for_billing, team_for_read
from watasu import errors
from watasu.api.fields import ClosedSerializer
from watasu.api.pagination import parse_limit
from watasu.api.schema import list_envelope, object_envelope
from watasu.api.views import ApiView, OnlyItsMethods, team_param

TEAM = OpenApiParameter("team", str, description="Team slug (default: your personal team)")


class LedgerEntrySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    amount = serializers.SerializerMethodField()
    amount_micros = serializers.IntegerField()
    at = serializers.DateTimeField()
    meter = serializers.CharField()
    window_start = serializers.DateTimeField(allow_null=True)
    reason = serializers.CharField()
    top_up_id = serializers.IntegerField(allow_null=True)

    def get_amount(self, entry: LedgerEntry) -> str:
        return format_micros(entry.amount_micros)


class TopUpSerializer(serializers.Serializer):
    """A top-up and its receipt (tax-inclusive amounts)."""

    id = serializers.IntegerField()
    status = serializers.CharField()
    amount = serializers.SerializerMethodField()
    amount_micros = serializers.IntegerField()
    currency = serializers.CharField()
    refunded = serializers.SerializerMethodField()
    payment_intent_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    succeeded_at = serializers.DateTimeField(allow_null=True)
    receipt = serializers.SerializerMethodField()

    def get_amount(self, top_up: TopUp) -> str:
        return format_micros(top_up.amount_micros)

    def get_refunded(self, top_up: TopUp) -> str:
        return format_micros(top_up.refunded_micros)

    def get_receipt(self, top_up: TopUp) -> dict[str, Any] | None:
        if top_up.succeeded_at is None:
            return None
        return {
            "number": top_up.receipt_number,
            "team": top_up.team.slug,
            "paid_at": top_up.succeeded_at,
            "amount": format_micros(top_up.amount_micros),
            "currency": top_up.currency,
            "tax_name": settings.BILLING_TAX_NAME,
            "tax_rate": str(settings.BILLING_TAX_RATE or 0),
            "tax_included": format_micros(selectors.tax_included(top_up.amount_micros)),
            "description": f"Prepaid credit for team {top_up.team.slug}",
        }


class TopUpCreateSerializer(ClosedSerializer):
    amount = serializers.DecimalField(
        max_digits=12, decimal_places=2, help_text='In the currency, e.g. "10.00"'
    )
    team = serializers.CharField(required=False)


class SpendAlertSerializer(ClosedSerializer):
    spend_alert = serializers.DecimalField(
        max_digits=12,
        decimal_places=2,
        min_value=Decimal("0.01"),
        allow_null=True,
        help_text="Monthly usage that mails owners",
    )
    team = serializers.CharField(required=False)


def _top_up_json(top_up: TopUp) -> dict[str, Any]:
    return TopUpSerializer(top_up).data  # type: ignore[return-value]


class BalanceView(ApiView):
    @extend_schema(
        summary="Balance",
        description="The team's prepaid balance, month-to-date usage, suspension and alert state.",
        parameters=[TEAM],
        responses=inline_serializer("BillingBalance", {"balance": serializers.DictField()}),
    )
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return Response({"balance": selectors.balance_of(team)})


class UsageView(ApiView):
    @extend_schema(
        summary="Usage",
        description="Metered usage whose window starts in [from, to) (default: this month so far), "
        "grouped by line_item, sandbox or day; keyset pages by group.",
        parameters=[
            TEAM,
            OpenApiParameter("from", str, description="Date or date-time with a zone"),
            OpenApiParameter("to", str, description="Date or date-time with a zone"),
            OpenApiParameter("group_by", str, enum=list(selectors.GROUPS)),
            OpenApiParameter("limit", int),
            OpenApiParameter("next_token", str),
        ],
        responses=inline_serializer(
            "BillingUsage",
            {
                "usage": serializers.ListField(child=serializers.DictField()),
                "next_token": serializers.CharField(allow_null=True),
                "total": serializers.DictField(),
                "from": serializers.DateTimeField(),
                "to": serializers.DateTimeField(),
                "group_by": serializers.CharField(),
            },
        ),
    )
    def get(self, request: Request) -> Response:
        params = request.query_params
        team = team_for_read(user=self.user, slug=team_param(request))
        now = timezone.now()
        start = selectors.parse_moment(params.get("from"), "from", month_start(now))
        end = selectors.parse_moment(params.get("to"), "to", now)
        group_by = params.get("group_by") or "line_item"
        rows, token, total = selectors.usage_of(
            team=team,
            start=start,
            end=end,
            group_by=group_by,
            after=params.get("next_token") or None,
            limit=parse_limit(params.get("limit")),
        )
        return Response(
            {
                "usage": rows,
                "next_token": token,
                "total": total,
                "from": start,
                "to": end,
                "group_by": group_by,
            }
        )


class LedgerView(ApiView):
    envelope = "entries"

    @extend_schema(
        operation_id="billing_ledger_list",
        summary="Ledger",
        description="Every movement of the team's balance, newest first.",
        parameters=[TEAM],
        responses=list_envelope("BillingLedger", "entries", LedgerEntrySerializer()),
    )
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return self.paginated(selectors.ledger_of(team), LedgerEntrySerializer)


class TopUpListView(ApiView):
    envelope = "top_ups"

    @extend_schema(
        operation_id="billing_top_ups_list",
        summary="Top-ups",
        description="The team's top-ups, newest first, each with its receipt once paid.",
        parameters=[TEAM],
        responses=list_envelope("TopUpList", "top_ups", TopUpSerializer()),
    )
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return self.paginated(selectors.top_ups_of(team).select_related("team"), TopUpSerializer)

    @extend_schema(
        summary="Start a top-up",
        description="A Stripe PaymentIntent for `amount`; confirm it with Stripe's Payment Element "
        "using `client_secret`. The balance is credited when Stripe reports the payment (owners and "
        "admins only; 409 `payments_not_configured` where the operator set no Stripe keys).",
        request=TopUpCreateSerializer,
        responses={
            201: inline_serializer(
                "TopUpCreated",
                {
                    "top_up": TopUpSerializer(),
                    "client_secret": serializers.CharField(),
                    "publishable_key": serializers.CharField(allow_null=True),
                },
            )
        },
    )
    def post(self, request: Request) -> Response:
        body = TopUpCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        team = team_for_billing(user=self.user, slug=body.validated_data.get("team") or team_param(request))
        top_up, secret = services.top_up_create(
            team=team, user=self.user, amount=body.validated_data["amount"]
        )
        return Response(
            {
                "top_up": _top_up_json(top_up),
                "client_secret": secret,
                "publishable_key": settings.STRIPE_PUBLISHABLE_KEY or None,
            },
            status=201,
        )


class TopUpDetailView(ApiView):
    @extend_schema(
        summary="Get a top-up",
        description="One top-up of the team, with its receipt once paid.",
        parameters=[TEAM],
        responses=object_envelope("TopUpDetail", "top_up", TopUpSerializer()),
    )
    def get(self, request: Request, top_up_id: str) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return Response({"top_up": _top_up_json(selectors.top_up_of(team, top_up_id))})


def _period(raw: str) -> date:
    try:
        day = datetime.strptime(raw, "%Y-%m").replace(tzinfo=UTC).date()
    except ValueError:
        raise errors.NotFound(
            "Statements are named by month, e.g. 2026-12.", code="statement_not_found"
        ) from None
    return day


class StatementListView(ApiView):
    @extend_schema(
        operation_id="billing_statements_list",
        summary="Statements",
        description="The current month (status open, computed now) and every closed month, newest first.",
        parameters=[TEAM],
        responses=inline_serializer(
            "StatementList", {"statements": serializers.ListField(child=serializers.DictField())}
        ),
    )
    def get(self, request: Request) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        return Response({"statements": [_statement_json(row) for row in selectors.statements_of(team)]})


class StatementDetailView(ApiView):
    @extend_schema(
        summary="Get a statement",
        description="One month (`2026-12`) of the team's ledger.",
        parameters=[TEAM],
        responses=inline_serializer("StatementDetail", {"statement": serializers.DictField()}),
    )
    def get(self, request: Request, period: str) -> Response:
        team = team_for_read(user=self.user, slug=team_param(request))
        wanted = _period(period)
        for row in selectors.statements_of(team):
            if row["period_start"] == wanted:
                return Response({"statement": _statement_json(row)})
        raise errors.NotFound(f"No statement for {period}.", code="statement_not_found")


def _statement_json(row: dict[str, Any]) -> dict[str, Any]:
    money = {key: value for key, value in row.items() if key.endswith("_micros")}
    shown = {key[: -len("_micros")]: format_micros(value) for key, value in money.items()}
    return {**row, **shown, "tax_rate": str(row["tax_rate"])}


class SpendAlertView(ApiView):
    @extend_schema(
        summary="Set the spend alert",
        description="Owners and admins get an email once a month when usage reaches this amount "
        "(null turns it off).",
        request=SpendAlertSerializer,
        responses=inline_serializer("BillingBalanceAfterAlert", {"balance": serializers.DictField()}),
    )
    def put(self, request: Request) -> Response:
        body = SpendAlertSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        team = team_for_billing(user=self.user, slug=body.validated_data.get("team") or team_param(request))
        services.spend_alert_set(team=team, amount=body.validated_data["spend_alert"])
        return Response({"balance": selectors.balance_of(team)})


class _RawBody(BaseParser):
    """The body as bytes: a signature is over the exact bytes Stripe sent."""

    media_type = "*/*"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> bytes:
        return stream.read() if stream is not None else b""


class StripeWebhookView(OnlyItsMethods, APIView):
    """Stripe's deliveries: no API key, the signature is the credential. 200 once recorded
    (a duplicate too, so Stripe stops retrying), 400 for a bad signature."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []
    throttle_classes: list[Any] = []
    parser_classes = [_RawBody]

    @extend_schema(exclude=True)
    def post(self, request: Request) -> Response:
        payload = request.data if isinstance(request.data, bytes) else b""
        outcome = services.stripe_webhook_handle(
            payload=payload, signature=request.headers.get("Stripe-Signature", "")
        )
        return Response({"received": True, "outcome": outcome})
