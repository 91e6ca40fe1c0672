from django.apps import AppConfig


class VolumesConfig(AppConfig):
    name = "volumes"

    def ready(self) -> None:
        from volumes.services import volumes_sweep
        from watasu.sweeps import register_sweep

        register_sweep("volumes", volumes_sweep)
