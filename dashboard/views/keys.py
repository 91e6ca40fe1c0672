"""Placeholder: replaced by this area's pages."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from dashboard.access import TeamAccess, team_page


@team_page()
def keys(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    return render(request, "dashboard/placeholder/page.html", {"heading": "API keys"})


urls = [
    path("keys", keys, name="keys"),
]
