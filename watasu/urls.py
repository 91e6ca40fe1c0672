"""URL routes. Paths have no trailing slash: the SDK never follows redirects."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from billing.api import views as billing_views
from sandboxes.api import checkpoints as checkpoint_views
from sandboxes.api import views as sandbox_views
from teams.api import views as team_views
from templates_app.api import views as template_views
from volumes.api import views as volume_views
from watasu.api.schema import DocsView, SchemaView

api_v1 = [
    path("schema", SchemaView.as_view(permission_classes=[], authentication_classes=[]), name="schema"),
    path("docs", DocsView.as_view(permission_classes=[], authentication_classes=[]), name="docs"),
    path("sandbox_limits", sandbox_views.SandboxLimitsView.as_view(), name="sandbox-limits"),
    path("sandboxes", sandbox_views.SandboxListView.as_view(), name="sandbox-list"),
    path("sandboxes/<str:sandbox_id>", sandbox_views.SandboxDetailView.as_view(), name="sandbox-detail"),
    path("sandboxes/<str:sandbox_id>/pause", sandbox_views.SandboxPauseView.as_view(), name="sandbox-pause"),
    path(
        "sandboxes/<str:sandbox_id>/network",
        sandbox_views.SandboxNetworkView.as_view(),
        name="sandbox-network",
    ),
    path("sandboxes/<str:sandbox_id>/stop", sandbox_views.SandboxPauseView.as_view(), name="sandbox-stop"),
    path(
        "sandboxes/<str:sandbox_id>/resume", sandbox_views.SandboxResumeView.as_view(), name="sandbox-resume"
    ),
    path(
        "sandboxes/<str:sandbox_id>/connect",
        sandbox_views.SandboxResumeView.as_view(),
        name="sandbox-connect",
    ),
    path(
        "sandboxes/<str:sandbox_id>/timeout",
        sandbox_views.SandboxTimeoutView.as_view(),
        name="sandbox-timeout",
    ),
    path(
        "sandboxes/<str:sandbox_id>/metrics",
        sandbox_views.SandboxMetricsView.as_view(),
        name="sandbox-metrics",
    ),
    path(
        "sandboxes/<str:sandbox_id>/ports/<str:port>",
        sandbox_views.SandboxPortView.as_view(),
        name="sandbox-port",
    ),
    path(
        "sandboxes/<str:sandbox_id>/files/upload_url",
        sandbox_views.SandboxUploadUrlView.as_view(),
        name="sandbox-upload-url",
    ),
    path(
        "sandboxes/<str:sandbox_id>/files/download_url",
        sandbox_views.SandboxDownloadUrlView.as_view(),
        name="sandbox-download-url",
    ),
    path(
        "sandboxes/<str:sandbox_id>/snapshots",
        checkpoint_views.SandboxSnapshotsView.as_view(),
        name="sandbox-snapshots",
    ),
    path(
        "sandboxes/<str:sandbox_id>/snapshots/<str:checkpoint_id>",
        checkpoint_views.SandboxCheckpointDetailView.as_view(),
        name="sandbox-snapshot-detail",
    ),
    path(
        "sandboxes/<str:sandbox_id>/checkpoints",
        checkpoint_views.SandboxCheckpointsView.as_view(),
        name="sandbox-checkpoints",
    ),
    path(
        "sandboxes/<str:sandbox_id>/checkpoints/<str:checkpoint_id>",
        checkpoint_views.SandboxCheckpointDetailView.as_view(),
        name="sandbox-checkpoint-detail",
    ),
    path(
        "sandboxes/<str:sandbox_id>/restore",
        checkpoint_views.SandboxRestoreView.as_view(),
        name="sandbox-restore",
    ),
    path("sandbox_snapshots", checkpoint_views.SnapshotListView.as_view(), name="snapshot-list"),
    path(
        "sandbox_snapshots/<str:snapshot_id>",
        checkpoint_views.SnapshotDetailView.as_view(),
        name="snapshot-detail",
    ),
    path("sandbox_templates", template_views.SandboxTemplateListView.as_view(), name="sandbox-template-list"),
    path(
        "sandbox_templates/<str:template_id>",
        template_views.SandboxTemplateDetailView.as_view(),
        name="sandbox-template-detail",
    ),
    path(
        "sandbox_templates/<str:template_id>/versions",
        template_views.SandboxTemplateVersionListView.as_view(),
        name="sandbox-template-versions",
    ),
    path(
        "sandbox_templates/<str:template_id>/versions/<str:version_id>",
        template_views.SandboxTemplateVersionDetailView.as_view(),
        name="sandbox-template-version",
    ),
    path(
        "sandbox_templates/<str:template_id>/versions/<str:version_id>/build_logs",
        template_views.SandboxTemplateVersionBuildLogsView.as_view(),
        name="sandbox-template-version-build-logs",
    ),
    path("templates", template_views.TemplateBuildView.as_view(), name="template-build"),
    path("templates/tags", template_views.TemplateTagAssignView.as_view(), name="template-tags"),
    path(
        "templates/<str:template_id>/builds/<str:build_id>/status",
        template_views.TemplateBuildStatusView.as_view(),
        name="template-build-status",
    ),
    path("templates/aliases/<str:alias>", template_views.TemplateAliasView.as_view(), name="template-alias"),
    path(
        "templates/<str:template>/tags", template_views.TemplateTagsView.as_view(), name="template-tag-list"
    ),
    path("volumes", volume_views.VolumeListView.as_view(), name="volume-list"),
    path("volumes/<str:volume_id>", volume_views.VolumeDetailView.as_view(), name="volume-detail"),
    path("volumes/<str:volume_id>/path", volume_views.VolumePathView.as_view(), name="volume-path"),
    path(
        "volumes/<str:volume_id>/directories",
        volume_views.VolumeDirectoriesView.as_view(),
        name="volume-directories",
    ),
    path("volumes/<str:volume_id>/files", volume_views.VolumeFilesView.as_view(), name="volume-files"),
    path("teams", team_views.TeamListView.as_view(), name="team-list"),
    path("teams/<str:slug>", team_views.TeamDetailView.as_view(), name="team-detail"),
    path("api_keys", team_views.ApiKeyListView.as_view(), name="api-key-list"),
    path("api_keys/<str:key_id>", team_views.ApiKeyDetailView.as_view(), name="api-key-detail"),
    path("billing/balance", billing_views.BalanceView.as_view(), name="billing-balance"),
    path("billing/usage", billing_views.UsageView.as_view(), name="billing-usage"),
    path("billing/ledger", billing_views.LedgerView.as_view(), name="billing-ledger"),
    path("billing/top_ups", billing_views.TopUpListView.as_view(), name="billing-top-ups"),
    path("billing/top_ups/<str:top_up_id>", billing_views.TopUpDetailView.as_view(), name="billing-top-up"),
    path("billing/statements", billing_views.StatementListView.as_view(), name="billing-statements"),
    path(
        "billing/statements/<str:period>",
        billing_views.StatementDetailView.as_view(),
        name="billing-statement",
    ),
    path("billing/spend_alert", billing_views.SpendAlertView.as_view(), name="billing-spend-alert"),
    path("billing/stripe/webhook", billing_views.StripeWebhookView.as_view(), name="billing-stripe-webhook"),
]

urlpatterns = [
    path("v1/", include(api_v1)),
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
    path("", RedirectView.as_view(pattern_name="dashboard:home"), name="root"),
]

handler400 = "watasu.api.errors.json_400"
handler403 = "dashboard.views.errors.forbidden"
handler404 = "dashboard.views.errors.not_found"
handler500 = "dashboard.views.errors.server_error"
