"""The dashboard's routes: account pages at the top, team pages under /dashboard/t/<team>/."""

from django.urls import include, path

from dashboard.views import auth, billing, home, keys, sandboxes, team, templates

app_name = "dashboard"

team_urls = [*sandboxes.urls, *templates.urls, *keys.urls, *billing.urls, *team.urls]

urlpatterns = [
    *auth.urls,
    *home.urls,
    path("t/<slug:team>/", include(team_urls)),
]
