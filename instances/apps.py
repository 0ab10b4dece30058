from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"
    verbose_name = "TEI instances"

    def ready(self) -> None:
        from instances import checks  # noqa: F401  (registers the system checks)
