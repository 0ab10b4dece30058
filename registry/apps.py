from typing import Any

from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Registry: models, downloads and checks"

    def ready(self) -> None:
        from instances import forms, services
        from registry import checks  # noqa: F401  (system checks)

        forms.registered_models = registered_models
        services.model_idle_timeout = model_idle_timeout
        services.memory_estimate = memory_estimate


def registered_models() -> dict[str, dict[str, Any]]:
    """Model id -> the create fields an instance of it gets (the instance add form's)."""
    from registry.models import Model
    from registry.services import instance_defaults

    return {model.model_id: instance_defaults(model) for model in Model.objects.all()}


def model_idle_timeout(model_id: str) -> int | None:
    from registry.models import Model

    row = Model.objects.filter(model_id=model_id).values_list("idle_timeout_secs", flat=True)
    return row.first()


def memory_estimate(model_id: str) -> int | None:
    from registry.models import Model

    model = Model.objects.filter(model_id=model_id).first()
    return None if model is None else model.memory_estimate
