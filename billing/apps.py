from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"

    def ready(self) -> None:
        from billing.services import billing_sweep
        from watasu.sweeps import register_sweep

        register_sweep("billing", billing_sweep)
