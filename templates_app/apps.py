from django.apps import AppConfig


class TemplatesAppConfig(AppConfig):
    name = "templates_app"
    verbose_name = "Templates"

    def ready(self) -> None:
        from templates_app import sweeps

        sweeps.register()  # the builds sweep and its parts of reconciliation and retention
