"""Sign-in, sign-out and the user's own account page."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path


@login_required
def account(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/account.html", {})


urls = [
    path(
        "sign-in",
        auth_views.LoginView.as_view(
            template_name="dashboard/auth/sign_in.html", redirect_authenticated_user=True
        ),
        name="sign-in",
    ),
    path("sign-out", auth_views.LogoutView.as_view(), name="sign-out"),
    path("account", account, name="account"),
]
