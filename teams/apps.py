from django.apps import AppConfig


class TeamsConfig(AppConfig):
    name = "teams"
    verbose_name = "Teams and API keys"

    def ready(self) -> None:
        import watasu.api.schema  # noqa: F401  registers the OpenAPI auth extension
        from teams.services import idempotency_records_expire
        from watasu import sweeps

        sweeps.register_retention(idempotency_records_expire)
