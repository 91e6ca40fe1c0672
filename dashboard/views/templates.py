"""Placeholder: replaced by this area's pages."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from dashboard.access import TeamAccess, team_page


@team_page()
def templates(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    return render(request, "dashboard/placeholder/page.html", {"heading": "Templates"})


@team_page()
def volumes(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    return render(request, "dashboard/placeholder/page.html", {"heading": "Volumes"})


@team_page()
def checkpoints(request: HttpRequest, access: TeamAccess) -> HttpResponse:
    return render(request, "dashboard/placeholder/page.html", {"heading": "Checkpoints"})


urls = [
    path("templates", templates, name="templates"),
    path("volumes", volumes, name="volumes"),
    path("checkpoints", checkpoints, name="checkpoints"),
]
