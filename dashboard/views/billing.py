"""Placeholder: replaced by this area's pages."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from dashboard.access import TeamAccess, team_page


@team_page()
def usage(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    return render(request, "dashboard/placeholder/page.html", {"heading": "Usage & billing"})


urls = [
    path("usage", usage, name="usage"),
]
