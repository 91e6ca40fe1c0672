"""URL routes. Paths have no trailing slash: the SDK never follows redirects."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from sandboxes.api.views import SandboxLimitsView
from teams.api import views as team_views

api_v1 = [
    path("schema", SpectacularAPIView.as_view(permission_classes=[], authentication_classes=[]),
         name="schema"),
    path("sandbox_limits", SandboxLimitsView.as_view(), name="sandbox-limits"),
    path("teams", team_views.TeamListView.as_view(), name="team-list"),
    path("teams/<str:slug>", team_views.TeamDetailView.as_view(), name="team-detail"),
    path("api_keys", team_views.ApiKeyListView.as_view(), name="api-key-list"),
    path("api_keys/<str:key_id>", team_views.ApiKeyDetailView.as_view(), name="api-key-detail"),
]

urlpatterns = [
    path("v1/", include(api_v1)),
    path("admin/", admin.site.urls),
]

handler404 = "watasu.api.errors.json_404"
handler500 = "watasu.api.errors.json_500"
