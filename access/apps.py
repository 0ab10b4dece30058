from django.apps import AppConfig


class AccessConfig(AppConfig):
    name = "access"
    verbose_name = "Access: API keys and audit trail"

    def ready(self) -> None:
        from access import checks, schema  # noqa: F401  (system checks, schema extensions)
