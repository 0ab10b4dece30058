"""The admin's add form: the REST API's InstanceCreateSerializer validates, and
services.create_instance creates, so the admin has no validation or defaults of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.conf import settings
from django.utils.html import format_html, format_html_join
from rest_framework.fields import empty

from access.audit import SYSTEM, Actor
from instances import errors, gpu, services
from instances.api.serializers import InstanceCreateSerializer
from instances.models import Instance, Pooling

# The registered models and the create fields each brings (model id -> fields), set by the
# registry app when it is installed (registry/apps.py): the add form offers them.
registered_models: Callable[[], dict[str, dict[str, Any]]] | None = None

# Where a service refusal belongs on the add form; anything else is a form-wide error.
ERROR_FIELDS: dict[type[errors.TeiManagerError], str] = {
    errors.InstanceExists: "name",
    errors.PortConflict: "port",
    errors.NodeNotFound: "node",
    errors.NodeDown: "node",
}


class SuggestingTextInput(forms.TextInput):
    """A text input with a <datalist> of suggestions (`suggestions`), still free text."""

    suggestions: list[str]

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__(attrs)
        self.suggestions = []

    def render(self, name: str, value: Any, attrs: Any = None, renderer: Any = None) -> Any:
        html = super().render(name, value, attrs, renderer)
        if not self.suggestions:
            return html
        options = format_html_join("", '<option value="{}">', ((s,) for s in self.suggestions))
        return html + format_html('<datalist id="{}">{}</datalist>', self.attrs["list"], options)


class InstanceCreateForm(forms.ModelForm):
    """The add form. One validation: the API's InstanceCreateSerializer checks and fills in
    defaults; services.create_instance creates. Fields are plain text so that nothing here
    second-guesses the serializer."""

    name = forms.CharField(strip=False)
    model_id = forms.CharField(
        label="Model ID", strip=False, widget=SuggestingTextInput(attrs={"class": "vTextField"})
    )
    pooling = forms.CharField(
        widget=forms.Select(choices=[("", "the model's own")] + list(Pooling.choices))
    )
    port = forms.CharField(widget=forms.NumberInput)
    prometheus_port = forms.CharField(label="Prometheus port", widget=forms.NumberInput)
    gpu_id = forms.CharField(label="GPU", widget=forms.NumberInput)
    max_batch_tokens = forms.CharField(widget=forms.NumberInput)
    max_concurrent_requests = forms.CharField(widget=forms.NumberInput)
    startup_timeout_secs = forms.CharField(
        label="Startup timeout (seconds)", widget=forms.NumberInput
    )
    idle_timeout_secs = forms.CharField(label="Idle timeout (seconds)", widget=forms.NumberInput)
    auto_truncate = forms.BooleanField(label="Auto-truncate")
    node = forms.CharField()
    failover = forms.CharField(
        widget=forms.Select(choices=[("", "the default"), ("true", "yes"), ("false", "no")])
    )
    extra_args = forms.CharField(
        label="Extra arguments", widget=forms.Textarea(attrs={"rows": 3, "cols": 60})
    )

    # Who adds it, for the audit trail: the admin sets the signed-in user.
    actor: Actor = SYSTEM

    class Meta:
        model = Instance
        fields: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        declared = InstanceCreateSerializer().fields
        help_texts = _help_texts()
        for name, field in self.fields.items():
            api_field = declared.get(name)
            field.required = bool(api_field and api_field.required)
            field.help_text = _with_default(help_texts.get(name, ""), api_field)
            default = getattr(api_field, "default", empty)
            if isinstance(field, forms.BooleanField):
                field.initial = default
            elif _shown(default):
                field.widget.attrs["placeholder"] = str(default)
        for name in ("port", "prometheus_port"):
            self.fields[name].widget.attrs["placeholder"] = "next free"
        self._offer_registered_models()

    def _offer_registered_models(self) -> None:
        """The registered models as suggestions for model_id; one named in the initial
        data (?model_id=... from the Models page) brings its instance defaults."""
        models = registered_models() if registered_models is not None else {}
        if not models:
            return
        widget = self.fields["model_id"].widget
        if isinstance(widget, SuggestingTextInput):
            widget.attrs["list"] = "tei-registered-models"
            widget.suggestions = sorted(models)
        defaults = models.get(str(self.initial.get("model_id", "")))
        for name, value in (defaults or {}).items():
            if name in self.fields and value not in (None, ""):
                self.initial[name] = value

    def clean(self) -> dict[str, Any]:
        # The admin saves through ModelForm.save(), which cannot report a refusal, so the
        # instance is created here: a name or port taken meanwhile becomes a field error.
        cleaned = super().clean() or {}
        if self.errors:
            return cleaned
        serializer = InstanceCreateSerializer(data=self._api_payload(cleaned))
        if not serializer.is_valid():
            for field, messages_ in serializer.errors.items():
                target = field if field in self.fields else None
                for message in _flatten(messages_):
                    self.add_error(target, message)
            return cleaned
        try:
            self.instance = services.create_instance(self.actor, **serializer.validated_data)
        except errors.TeiManagerError as exc:
            self.add_error(ERROR_FIELDS.get(type(exc)), str(exc))
        return cleaned

    def _post_clean(self) -> None:
        """No model validation: the serializer above is the only one."""

    @staticmethod
    def _api_payload(cleaned: dict[str, Any]) -> dict[str, Any]:
        """The POST /instances body this form stands for; empty fields are left out."""
        payload: dict[str, Any] = {}
        for name, value in cleaned.items():
            if isinstance(value, bool):
                payload[name] = value
                continue
            text = (value or "").strip()
            if not text:
                continue
            if name == "extra_args":
                payload[name] = [line.strip() for line in text.splitlines() if line.strip()]
            else:
                payload[name] = text
        return payload


def _help_texts() -> dict[str, str]:
    """Each add-form field's help (read once per form: it asks NVML for the GPUs)."""
    tei = settings.TEI
    return {
        "name": "A short slug (letters, digits, - and _) that names the instance and its "
        "log file. It cannot be changed later.",
        "model_id": "A Hugging Face model ID, e.g. sentence-transformers/all-MiniLM-L6-v2, "
        "or a local model directory.",
        "pooling": "How token embeddings become one vector (--pooling). Empty: the model's "
        "own pooling configuration, else CLS.",
        "port": f"The gRPC port the instance serves on. Empty: the next free port in "
        f"{tei.instance_port_start}–{tei.instance_port_end}.",
        "prometheus_port": f"The port of the instance's Prometheus metrics. Empty: the next "
        f"free port in {tei.prometheus_port_start}–{tei.prometheus_port_end}.",
        "gpu_id": "The NVML index of the GPU to pin the instance to (CUDA_VISIBLE_DEVICES). "
        f"Empty: not pinned. {_detected_gpus()}",
        "max_batch_tokens": "The most tokens in one batch (--max-batch-tokens).",
        "max_concurrent_requests": "Requests in flight before new ones are refused with "
        "RESOURCE_EXHAUSTED (--max-concurrent-requests).",
        "auto_truncate": "Cut inputs longer than the model's limit instead of refusing them "
        "(--auto-truncate).",
        "startup_timeout_secs": "Seconds the model may take to load before the start counts "
        f"as failed. Empty: the manager's default, {tei.startup_timeout_secs}s.",
        "node": "The node to run it on (the Nodes page lists them). Empty: "
        + ("this node." if tei.placement == "local" else "an up node with room."),
        "failover": "Start it on another node when its node is down. Default: "
        f"{'yes' if tei.failover_default else 'no'}.",
        "idle_timeout_secs": "Stop the instance after this many seconds without a call; the "
        "next call for an on-demand model starts it again. Empty: the model's setting.",
        "extra_args": "More text-embeddings-router flags, one argument per line: e.g. "
        "--auto-truncate, or --dtype and then float16 on the next line. They are passed "
        "as arguments, never through a shell.",
    }


def _with_default(text: str, api_field: Any) -> str:
    default = getattr(api_field, "default", empty)
    if _shown(default):
        text = f"{text} Default: {default}."
    return text


def _shown(default: Any) -> bool:
    """Whether an API default is a value worth showing (not "none", not a factory)."""
    return default is not empty and not callable(default) and default not in (None, "", True)


def _detected_gpus() -> str:
    gpus = gpu.stats()
    if not gpus:
        return "No NVIDIA GPU is detected on this host."
    return "Detected: " + ", ".join(f"{g.index} ({g.name})" for g in gpus) + "."


def _flatten(detail: Any) -> list[str]:
    """DRF error details (lists, or dicts for list items) as plain messages."""
    if isinstance(detail, dict):
        return [f"item {key}: {m}" for key, value in detail.items() for m in _flatten(value)]
    if isinstance(detail, list | tuple):
        return [m for item in detail for m in _flatten(item)]
    return [str(detail)]
