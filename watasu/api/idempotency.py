"""`Idempotency-Key` for mutating control-plane requests.

Same key + same request from the same API key replays the first response;
a different request under that key is 422; a retry while the first is still
running is 409. The unique (api_key, key) constraint decides which of several
concurrent requests does the work, so this holds across processes.
A 5xx, a 429 or a crash releases the key so that a retry can do the work.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone

from teams.authentication import bearer_token
from teams.models import ApiKey, IdempotencyRecord, IdempotencyState
from teams.services import api_key_authenticate
from watasu import crypto
from watasu.api.errors import error_body
from watasu.api.fields import has_control_characters

HEADER = "Idempotency-Key"
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_KEY_LENGTH = 255
API_PREFIX = "/v1/"


class Outcome(enum.Enum):
    STARTED = "started"
    REPLAY = "replay"
    MISMATCH = "mismatch"
    IN_PROGRESS = "in_progress"


@dataclass(frozen=True)
class Claim:
    outcome: Outcome
    record: IdempotencyRecord | None = None


def request_fingerprint(request: HttpRequest) -> str:
    """Hash of what makes two requests 'the same': method, path, query, JSON body."""
    body = request.body
    with contextlib.suppress(ValueError, RecursionError):  # not JSON: compare the raw bytes
        body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256()
    for part in (request.method or "", request.path, request.META.get("QUERY_STRING", "")):
        digest.update(part.encode() + b"\0")
    digest.update(body)
    return digest.hexdigest()


def _insert(api_key: ApiKey, key: str, fingerprint: str) -> IdempotencyRecord | None:
    now = timezone.now()
    try:
        with transaction.atomic():
            return IdempotencyRecord.objects.create(
                api_key=api_key,
                key=key,
                fingerprint=fingerprint,
                lease_expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_LEASE_SECONDS),
                expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS),
            )
    except IntegrityError:
        return None


def _take_over_abandoned(record: IdempotencyRecord) -> bool:
    """Claim an in-flight record whose request died (its lease ran out)."""
    now = timezone.now()
    claimed = IdempotencyRecord.objects.filter(
        pk=record.pk,
        state=IdempotencyState.IN_PROGRESS,
        lease_expires_at=record.lease_expires_at,
    ).update(lease_expires_at=now + timedelta(seconds=settings.IDEMPOTENCY_LEASE_SECONDS))
    return claimed == 1


def idempotency_claim(*, api_key: ApiKey, key: str, fingerprint: str) -> Claim:
    """Decide what a request carrying `key` does: start, replay, or be refused."""
    for _ in range(3):
        record = _insert(api_key, key, fingerprint)
        if record is not None:
            return Claim(Outcome.STARTED, record)
        existing = IdempotencyRecord.objects.filter(api_key=api_key, key=key).first()
        if existing is None:
            continue  # released between our insert and our read
        if existing.expires_at <= timezone.now():
            IdempotencyRecord.objects.filter(pk=existing.pk, expires_at=existing.expires_at).delete()
            continue
        if existing.fingerprint != fingerprint:
            return Claim(Outcome.MISMATCH, existing)
        if existing.state == IdempotencyState.COMPLETED:
            return Claim(Outcome.REPLAY, existing)
        if existing.lease_expires_at <= timezone.now() and _take_over_abandoned(existing):
            return Claim(Outcome.STARTED, existing)
        return Claim(Outcome.IN_PROGRESS, existing)
    return Claim(Outcome.IN_PROGRESS)


def idempotency_complete(*, record: IdempotencyRecord, response: HttpResponse) -> None:
    """Keep the response for replays, encrypted: it may carry a session token or a new
    API key, which the database must never hold in clear (`watasu.crypto`)."""
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        state=IdempotencyState.COMPLETED,
        response_status=response.status_code,
        response_body=crypto.encrypt_bytes(response.content),
        response_content_type=response.get("Content-Type", ""),
    )


def idempotency_release(*, record: IdempotencyRecord) -> None:
    IdempotencyRecord.objects.filter(pk=record.pk, state=IdempotencyState.IN_PROGRESS).delete()


def _replay(record: IdempotencyRecord) -> HttpResponse:
    """The first response again: same body, so a replayed create hands back the same
    session token, still valid (tokens are signed, not stored)."""
    response = HttpResponse(
        crypto.decrypt_bytes(bytes(record.response_body or b"")),
        status=record.response_status,
        content_type=record.response_content_type or None,
    )
    response["Idempotent-Replayed"] = "true"
    return response


def _refusal(claim: Claim, key: str) -> JsonResponse:
    if claim.outcome is Outcome.MISMATCH:
        return JsonResponse(
            error_body(
                "idempotency_key_reused",
                f"Idempotency-Key '{key}' was already used with a different request.",
            ),
            status=422,
        )
    return JsonResponse(
        error_body(
            "idempotency_key_in_progress",
            f"A request with Idempotency-Key '{key}' is still in progress; retry later.",
        ),
        status=409,
        headers={"Retry-After": "1"},
    )


def _api_key_of(request: HttpRequest) -> ApiKey | None:
    token = bearer_token(request.headers.get("Authorization", ""))
    return api_key_authenticate(raw_key=token) if token else None


class IdempotencyMiddleware:
    """Applies the Idempotency-Key contract to mutating `/v1/` requests."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        key = request.headers.get(HEADER, "").strip()
        if not key or request.method not in MUTATING_METHODS or not request.path.startswith(API_PREFIX):
            return self.get_response(request)
        api_key = _api_key_of(request)
        if api_key is None or not api_key.can_write:
            return self.get_response(request)  # the API answers 401/403 itself
        if len(key) > MAX_KEY_LENGTH:
            return JsonResponse(
                error_body(
                    "validation_failed", f"Idempotency-Key is longer than {MAX_KEY_LENGTH} characters."
                ),
                status=422,
            )
        if has_control_characters(key):
            return JsonResponse(
                error_body("validation_failed", "Idempotency-Key must not contain control characters."),
                status=422,
            )
        claim = idempotency_claim(api_key=api_key, key=key, fingerprint=request_fingerprint(request))
        if claim.outcome is Outcome.REPLAY:
            return _replay(claim.record)
        if claim.outcome is not Outcome.STARTED:
            return _refusal(claim, key)
        return self._run(request, claim.record)

    def _run(self, request: HttpRequest, record: IdempotencyRecord) -> HttpResponse:
        try:
            response = self.get_response(request)
        except BaseException:
            idempotency_release(record=record)
            raise
        # A 5xx, a crash or a 429 (try again later) is not the request's outcome: the key is
        # released so that the retry the client was told to make does the work.
        if response.status_code >= 500 or response.status_code == 429 or response.streaming:
            idempotency_release(record=record)
        else:
            idempotency_complete(record=record, response=response)
        return response
