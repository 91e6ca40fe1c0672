"""Signing in (password, then an authenticator code when the user turned it on), signing
up, password resets, invitations and the user's own account page.

Sign-in attempts are counted per email and per client address in the shared cache (Redis
when configured); past `SIGNIN_ATTEMPTS` failures in `SIGNIN_WINDOW_SECONDS` an attempt is
refused before any password is checked, and the page says when to try again.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login, update_session_auth_hash
from django.contrib.auth import forms as auth_forms
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import PasswordChangeForm
from django.core.cache import cache
from django.db import IntegrityError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import path, reverse, reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from dashboard.actions import perform
from dashboard.forms import CodeForm, PasswordResetForm, SignInForm, SignUpForm, TeamCreateForm
from teams import selectors, services, totp
from teams.models import Membership, TotpDevice, User

PENDING = "dashboard_signin_pending"  # the half-signed-in state: password right, code to come
PENDING_SECONDS = 300
BACKEND = "django.contrib.auth.backends.ModelBackend"


# --- attempt counting -----------------------------------------------------------------


def _client_address(request: HttpRequest) -> str:
    return str(request.META.get("REMOTE_ADDR") or "unknown")


def _limit_keys(request: HttpRequest, email: str, kind: str = "signin") -> list[str]:
    digest = hashlib.sha256(email.encode()).hexdigest()[:32]
    return [f"{kind}:email:{digest}", f"{kind}:ip:{_client_address(request)}"]


def _refusal(request: HttpRequest, email: str, kind: str = "signin") -> str | None:
    """Why this attempt is refused (and when to retry), or None to go on."""
    now = time.time()
    for key in _limit_keys(request, email, kind):
        if int(cache.get(f"{key}:n", 0)) >= settings.SIGNIN_ATTEMPTS:
            until = float(cache.get(f"{key}:t", now + settings.SIGNIN_WINDOW_SECONDS))
            minutes = max(1, math.ceil((until - now) / 60))
            return f"Too many sign-in attempts. Try again in {minutes} minute{'s' if minutes > 1 else ''}."
    return None


def _count_failure(request: HttpRequest, email: str, kind: str = "signin") -> None:
    window = settings.SIGNIN_WINDOW_SECONDS
    for key in _limit_keys(request, email, kind):
        cache.add(f"{key}:t", time.time() + window, window)
        cache.add(f"{key}:n", 0, window)
        try:
            cache.incr(f"{key}:n")
        except ValueError:  # expired between add and incr
            cache.set(f"{key}:n", 1, window)


class SignOut(auth_views.LogoutView):
    """Sign-out is a POST (a link on another site cannot sign anyone out); a GET, from a
    typed or bookmarked URL, shows the button instead of a bare 405."""

    http_method_names = ["get", "post", "options"]

    def get(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        return render(request, "dashboard/auth/sign_out.html", {})


class PasswordReset(auth_views.PasswordResetView):
    """Django's reset, with its link on the public URL (never the request's Host) and the
    sign-in limits on the mails it sends per email and per client address: past them the
    page answers as always and sends nothing (no mail flood, nothing to learn)."""

    template_name = "dashboard/auth/password_reset.html"
    form_class = PasswordResetForm
    email_template_name = "dashboard/auth/password_reset_email.txt"
    subject_template_name = "dashboard/auth/password_reset_subject.txt"
    success_url = reverse_lazy("dashboard:password-reset-done")

    def form_valid(self, form: auth_forms.PasswordResetForm) -> HttpResponse:
        email = form.cleaned_data["email"].strip().lower()
        if _refusal(self.request, email, "reset") is not None:
            return HttpResponseRedirect(self.get_success_url())
        _count_failure(self.request, email, "reset")
        self.extra_email_context = {"public_url": settings.PUBLIC_URL}
        return super().form_valid(form)


# --- sign-in ----------------------------------------------------------------------------


def _safe_next(request: HttpRequest, raw: str | None) -> str:
    if raw and url_has_allowed_host_and_scheme(raw, {request.get_host()}, require_https=request.is_secure()):
        return raw
    return reverse("dashboard:home")


def sign_in(request: HttpRequest) -> HttpResponse:
    next_url = _safe_next(request, request.POST.get("next") or request.GET.get("next"))
    if request.user.is_authenticated:
        return redirect(next_url)
    form = SignInForm(request.POST if request.method == "POST" else None)
    status = 200
    if form.is_bound and form.is_valid():
        email, password = form.cleaned_data["username"], form.cleaned_data["password"]
        refusal = _refusal(request, email)
        user = None if refusal else authenticate(request, username=email, password=password)
        if refusal:
            form.add_error(None, refusal)
            status = 429
        elif user is None:
            _count_failure(request, email)
            form.add_error(None, "Wrong email or password.")
            status = 400
        elif services.totp_enabled(user):
            request.session[PENDING] = {"user": user.pk, "next": next_url, "at": time.time()}
            return redirect("dashboard:sign-in-code")
        else:
            login(request, user, backend=BACKEND)
            return redirect(next_url)
    context = {"form": form, "next": next_url, "signup_open": settings.SIGNUP_OPEN}
    return render(request, "dashboard/auth/sign_in.html", context, status=status)


def _pending_user(request: HttpRequest) -> tuple[User, str] | None:
    pending = request.session.get(PENDING)
    if not isinstance(pending, dict) or time.time() - float(pending.get("at", 0)) > PENDING_SECONDS:
        return None
    user_id = pending.get("user")
    if not isinstance(user_id, int):
        return None
    user = User.objects.filter(pk=user_id, is_active=True).first()
    return (user, str(pending.get("next") or "")) if user else None


def sign_in_code(request: HttpRequest) -> HttpResponse:
    """The second step: a code from the authenticator app, within minutes of the password."""
    pending = _pending_user(request)
    if pending is None:
        if request.session.pop(PENDING, None) is not None:
            messages.info(request, "Sign in again: the code step timed out.")
        return redirect("dashboard:sign-in")
    user, next_url = pending
    form = CodeForm(request.POST if request.method == "POST" else None)
    status = 200
    if form.is_bound and form.is_valid():
        refusal = _refusal(request, user.email)
        if refusal:
            form.add_error(None, refusal)
            status = 429
        elif services.totp_verify(user=user, code=form.cleaned_data["code"]):
            request.session.pop(PENDING, None)
            login(request, user, backend=BACKEND)
            return redirect(_safe_next(request, next_url))
        else:
            _count_failure(request, user.email)
            form.add_error("code", "That code is not right (or was already used). Try the next one.")
            status = 400
    return render(request, "dashboard/auth/sign_in_code.html", {"form": form}, status=status)


# --- sign-up and invitations ---------------------------------------------------------------


def _usable_invitation(raw_token: str) -> Any:
    invitation = selectors.invitation_by_token(raw_token=raw_token) if raw_token else None
    return invitation if invitation is not None and services.invitation_problem(invitation) is None else None


def sign_up(request: HttpRequest) -> HttpResponse:
    """Open sign-up, or (closed) only through a pending invitation's link, for its email."""
    token = request.POST.get("invitation") or request.GET.get("invitation") or ""
    invitation = _usable_invitation(token)
    if token and invitation is None:
        return redirect("dashboard:invitation", token)
    if not settings.SIGNUP_OPEN and invitation is None:
        raise Http404("Sign-up is closed.")
    if request.user.is_authenticated:
        return redirect("dashboard:invitation", token) if invitation else redirect("dashboard:home")
    form = SignUpForm(request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        email = form.cleaned_data["email"]
        if invitation is not None and email != invitation.email:
            form.add_error("email", f"This invitation is for {invitation.email}.")
        else:
            try:
                user = User.objects.create_user(email, form.cleaned_data["password"])
            except IntegrityError:
                form.add_error("email", "There is already an account with this email; sign in instead.")
            else:
                login(request, user, backend=BACKEND)
                return _after_sign_up(request, user, token if invitation else "")
    context = {"form": form, "invitation": invitation, "token": token if invitation else ""}
    return render(request, "dashboard/auth/sign_up.html", context, status=400 if form.errors else 200)


def _after_sign_up(request: HttpRequest, user: User, token: str) -> HttpResponse:
    if token:
        membership = perform(request, lambda: services.invitation_accept(user=user, raw_token=token))
        if membership is not None:
            messages.success(request, f"Welcome to {membership.team.name}.")
            return redirect("dashboard:sandboxes", membership.team.slug)
    return redirect("dashboard:sandboxes", services.personal_team_ensure(user=user).slug)


def invitation(request: HttpRequest, token: str) -> HttpResponse:
    """An invitation's link: who it is for, and accept (signed in with that email)."""
    found = selectors.invitation_by_token(raw_token=token)
    problem = "There is no such invitation." if found is None else services.invitation_problem(found)
    user = request.user if request.user.is_authenticated else None
    if request.method == "POST" and problem is None:
        if user is None:
            return redirect(f"{reverse('dashboard:sign-in')}?next={request.path}")
        membership = perform(request, lambda: services.invitation_accept(user=user, raw_token=token))
        if membership is not None:
            messages.success(request, f"You joined {membership.team.name} as {membership.role}.")
            return redirect("dashboard:sandboxes", membership.team.slug)
    wrong_email = user is not None and found is not None and user.email != found.email
    context = {
        "invitation": found,
        "problem": problem,
        "token": token,
        "wrong_email": wrong_email,
        "account_exists": found is not None and User.objects.filter(email=found.email).exists(),
    }
    status = 410 if problem and found is not None else 404 if found is None else 403 if wrong_email else 200
    return render(request, "dashboard/auth/invitation.html", context, status=status)


# --- the account page ---------------------------------------------------------------------


def _account_page(request: HttpRequest, *, status: int = 200, **forms: Any) -> HttpResponse:
    user: User = request.user  # type: ignore[assignment]
    device = TotpDevice.objects.filter(user=user).first()
    setup: dict[str, str] = {}
    if device is not None and device.confirmed_at is None:
        secret = services.totp_secret(device)
        setup = {"secret": secret, "uri": totp.provisioning_uri(secret, account=user.email, issuer="Watasu")}
    context = {
        "password_form": forms.get("password_form") or PasswordChangeForm(user),
        "team_form": forms.get("team_form") or TeamCreateForm(),
        "device": device,
        "setup": setup,
        "account_memberships": Membership.objects.select_related("team")
        .filter(user=user)
        .order_by("team__slug"),
    }
    return render(request, "dashboard/account.html", context, status=status)


@login_required
def account(request: HttpRequest) -> HttpResponse:
    return _account_page(request)


@login_required
@require_POST
def password_change(request: HttpRequest) -> HttpResponse:
    user: User = request.user  # type: ignore[assignment]
    form = PasswordChangeForm(user, request.POST)
    if not form.is_valid():
        return _account_page(request, status=400, password_form=form)
    form.save()
    update_session_auth_hash(request, form.user)
    messages.success(request, "Your password was changed.")
    return redirect("dashboard:account")


@login_required
@require_POST
def totp_start(request: HttpRequest) -> HttpResponse:
    perform(request, lambda: services.totp_start(user=request.user))  # type: ignore[arg-type]
    return redirect(f"{reverse('dashboard:account')}#two-factor")


@login_required
@require_POST
def totp_confirm(request: HttpRequest) -> HttpResponse:
    form = CodeForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Enter the 6 digits the app shows.")
    else:
        code = form.cleaned_data["code"]
        done = perform(request, lambda: services.totp_confirm(user=request.user, code=code))  # type: ignore[arg-type]
        if done is not None:
            messages.success(request, "Two-factor sign-in is on: sign-in now asks for a code from the app.")
    return redirect(f"{reverse('dashboard:account')}#two-factor")


@login_required
@require_POST
def totp_disable(request: HttpRequest) -> HttpResponse:
    form = CodeForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Enter the 6 digits the app shows.")
    else:
        code = form.cleaned_data["code"]
        user: User = request.user  # type: ignore[assignment]
        if perform(request, lambda: services.totp_disable(user=user, code=code)):
            messages.success(request, "Two-factor sign-in is off.")
    return redirect(f"{reverse('dashboard:account')}#two-factor")


@login_required
@require_http_methods(["GET", "POST"])
def team_create(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":  # a reload after a refused form: the form is on the account page
        return redirect("dashboard:account")
    form = TeamCreateForm(request.POST)
    if not form.is_valid():
        return _account_page(request, status=400, team_form=form)
    user: User = request.user  # type: ignore[assignment]
    data = form.cleaned_data
    team = perform(request, lambda: services.team_create(owner=user, slug=data["slug"], name=data["name"]))
    if team is None:
        return redirect("dashboard:account")
    services.audit_record(team=team, actor=user, action="team.create", target=team.slug, source="dashboard")
    messages.success(request, f"Team {team.name} created; you are its owner.")
    request.session["dashboard_team"] = team.slug
    return redirect("dashboard:sandboxes", team.slug)


urls = [
    path("sign-in", sign_in, name="sign-in"),
    path("sign-in/code", sign_in_code, name="sign-in-code"),
    path("sign-out", SignOut.as_view(), name="sign-out"),
    path("sign-up", sign_up, name="sign-up"),
    path("invitations/<str:token>", invitation, name="invitation"),
    path("account", account, name="account"),
    path("account/password", password_change, name="account-password"),
    path("account/two-factor/start", totp_start, name="totp-start"),
    path("account/two-factor/confirm", totp_confirm, name="totp-confirm"),
    path("account/two-factor/disable", totp_disable, name="totp-disable"),
    path("teams/new", team_create, name="team-create"),
    path(
        "password-reset",
        PasswordReset.as_view(),
        name="password-reset",
    ),
    path(
        "password-reset/done",
        auth_views.PasswordResetDoneView.as_view(template_name="dashboard/auth/password_reset_done.html"),
        name="password-reset-done",
    ),
    path(
        "password-reset/confirm/<uidb64>/<token>",
        auth_views.PasswordResetConfirmView.as_view(
            template_name="dashboard/auth/password_reset_confirm.html",
            success_url=reverse_lazy("dashboard:password-reset-complete"),
        ),
        name="password-reset-confirm",
    ),
    path(
        "password-reset/complete",
        auth_views.PasswordResetCompleteView.as_view(
            template_name="dashboard/auth/password_reset_complete.html"
        ),
        name="password-reset-complete",
    ),
]
