"""The Instance admin: list, filters, bulk actions, add form, instance page, security."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.contrib.staticfiles import finders
from django.http import HttpResponse
from django.test import Client
from django.utils import timezone

from instances.forms import InstanceCreateForm
from instances.models import Instance
from tests.fake_nvml import use_fake_gpus

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

LIST = "/admin/instances/instance/"
ADD = "/admin/instances/instance/add/"


@pytest.fixture(autouse=True)
def fast_passwords(settings: Any) -> None:
    """admin_client's superuser would otherwise cost a second of PBKDF2 per test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def make(name: str, port: int, **fields: Any) -> Instance:
    fields.setdefault("model_id", "org/model")
    fields.setdefault("node", django_settings.NODE_NAME)
    return Instance.objects.create(name=name, port=port, prometheus_port=port + 1000, **fields)


def page_of(instance: Instance, suffix: str = "change/") -> str:
    return f"{LIST}{instance.pk}/{suffix}"


def texts(response: HttpResponse) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def act(client: Client, action: str, *instances: Instance, **extra: str) -> HttpResponse:
    data = {"action": action, "_selected_action": [i.pk for i in instances], **extra}
    return client.post(LIST, data, follow=True)


def listed(response: HttpResponse) -> list[str]:
    return [i.name for i in response.context["cl"].result_list]


# -- security --


def test_it_requires_a_staff_login_for_every_page_and_action(
    client: Client, django_user_model: Any
) -> None:
    instance = make("a", 8100, status="stopped")
    pages = [LIST, ADD, page_of(instance), page_of(instance, "delete/"), "/admin/"]
    django_user_model.objects.create_user("plain", password="pw")
    for login in (False, True):
        if login:
            client.login(username="plain", password="pw")
        for url in pages:
            assert client.get(url)["Location"].startswith("/admin/login/"), url
        for url in (page_of(instance, "start/"), LIST, ADD):
            response = client.post(url, {"action": "start_selected", "name": "x"})
            assert response["Location"].startswith("/admin/login/"), url
    assert Instance.objects.get().status == "stopped"


def test_it_requires_csrf_on_every_action(admin_user: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    instance = make("a", 8100, status="stopped")
    posts = [
        (page_of(instance, "start/"), {}),
        (LIST, {"action": "start_selected", "_selected_action": [instance.pk]}),
        (ADD, {"name": "b", "model_id": "org/model"}),
        (page_of(instance, "delete/"), {"post": "yes"}),
    ]
    for url, data in posts:
        assert client.post(url, data).status_code == 403, url
    assert list(Instance.objects.values_list("name", "status")) == [("a", "stopped")]


def test_it_reaches_no_action_by_get(admin_client: Client) -> None:
    instance = make("a", 8100, status="stopped")
    for verb in ("start", "stop", "restart"):
        assert admin_client.get(page_of(instance, f"{verb}/")).status_code == 405
    admin_client.get(LIST, {"action": "start_selected", "_selected_action": instance.pk})
    admin_client.get(page_of(instance, "delete/"))
    assert Instance.objects.get().status == "stopped"


def test_it_refuses_to_edit_an_instance(admin_client: Client) -> None:
    instance = make("a", 8100, status="stopped")
    response = admin_client.post(page_of(instance), {"model_id": "other/model", "port": 9999})
    assert response.status_code == 403
    assert Instance.objects.get().model_id == "org/model"


def test_it_lets_view_only_staff_look_but_not_operate(
    client: Client, django_user_model: Any
) -> None:
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_instance"))
    client.force_login(viewer)
    instance = make("a", 8100, status="stopped")
    response = client.get(LIST)
    assert response.status_code == 200
    assert "start_selected" not in response.content.decode()
    page = client.get(page_of(instance)).content.decode()
    assert 'class="tei-start"' not in page
    assert client.post(page_of(instance, "start/")).status_code == 403
    act(client, "start_selected", instance)
    assert Instance.objects.get().status == "stopped"


# -- the list --


def test_it_lists_every_column_with_a_coloured_status_badge(admin_client: Client) -> None:
    started = timezone.now() - timedelta(hours=2, minutes=5)
    make(
        "runner", 8100, status="running", started_at=started, restarts=3,
        health_check_failures=1, gpu_id=1,
    )  # fmt: skip
    make("broken", 8101, status="failed", last_error="x" * 200 + "\nsecond line")
    page = admin_client.get(LIST).content.decode()
    assert (
        '<span class="tei-badge tei-badge--running" data-instance="runner" '
        'data-field="status">running</span>'
    ) in page
    assert "tei-badge--failed" in page
    assert 'data-field="uptime">2h 05m<' in page
    assert 'data-field="restarts">3<' in page
    assert 'data-field="health_check_failures">1<' in page
    assert ">" + "x" * 59 + "…<" in page
    assert 'title="' + "x" * 200 in page
    for column in ("Name", "Model id", "Port", "GPU", "Status", "Uptime", "Restarts"):
        assert f">{column}</a>" in page or f">{column}</span>" in page, column


def test_it_filters_by_status_model_and_gpu(admin_client: Client) -> None:
    make("a", 8100, status="running", model_id="org/one", gpu_id=0)
    make("b", 8101, status="failed", model_id="org/two", gpu_id=1)
    make("c", 8102, status="running", model_id="org/two")
    assert listed(admin_client.get(LIST, {"status__exact": "running"})) == ["a", "c"]
    assert listed(admin_client.get(LIST, {"model": "org/two"})) == ["b", "c"]
    assert listed(admin_client.get(LIST, {"gpu": "1"})) == ["b"]
    assert listed(admin_client.get(LIST, {"gpu": "none"})) == ["c"]
    page = admin_client.get(LIST).content.decode()
    assert "By model" in page and "By GPU" in page and "not pinned" in page


def test_it_searches_by_name_and_model(admin_client: Client) -> None:
    make("minilm", 8100, model_id="sentence-transformers/all-MiniLM-L6-v2")
    make("bge", 8101, model_id="BAAI/bge-small-en-v1.5")
    assert listed(admin_client.get(LIST, {"q": "mini"})) == ["minilm"]
    assert listed(admin_client.get(LIST, {"q": "BAAI"})) == ["bge"]


# -- bulk actions --


def test_it_starts_stopped_instances_in_bulk(admin_client: Client) -> None:
    a = make("a", 8100, status="stopped", desired_state="stopped")
    b = make("b", 8101, status="failed", desired_state="stopped")
    response = act(admin_client, "start_selected", a, b)
    assert response.status_code == 200
    assert texts(response) == ["Starting 2 instances: a, b."]
    assert set(Instance.objects.values_list("status", "desired_state")) == {("pending", "running")}


def test_it_refuses_start_on_a_running_instance_with_a_clear_message(
    admin_client: Client,
) -> None:
    running = make("on", 8100, status="running")
    stopped = make("off", 8101, status="stopped", desired_state="stopped")
    response = act(admin_client, "start_selected", running, stopped)
    assert response.status_code == 200
    assert texts(response) == [
        "Cannot start: instance 'on' is already running.",
        "Starting 1 instance: off.",
    ]
    assert response.context["messages"] is not None
    assert Instance.objects.get(name="on").status == "running"


def test_it_stops_in_bulk_and_refuses_what_is_not_running(admin_client: Client) -> None:
    running = make("on", 8100, status="running")
    stopped = make("off", 8101, status="stopped", desired_state="stopped")
    response = act(admin_client, "stop_selected", running, stopped)
    assert texts(response) == [
        "Cannot stop: instance 'off' is stopped, not running.",
        "Stopping 1 instance: on.",
    ]
    assert Instance.objects.get(name="on").status == "stopping"
    assert Instance.objects.get(name="on").desired_state == "stopped"


def test_it_restarts_in_bulk(admin_client: Client) -> None:
    running = make("on", 8100, status="running", restarts=2)
    response = act(admin_client, "restart_selected", running)
    assert texts(response) == ["Restarting 1 instance: on."]
    running.refresh_from_db()
    assert (running.status, running.restarts) == ("pending", 3)


def test_it_deletes_in_bulk_after_a_confirmation(admin_client: Client) -> None:
    a = make("a", 8100, status="running", pid=None)
    b = make("b", 8101, status="stopped")
    make("keep", 8102)
    confirm = admin_client.post(
        LIST, {"action": "delete_selected", "_selected_action": [a.pk, b.pk]}
    )
    assert confirm.status_code == 200
    assert "Are you sure" in confirm.content.decode()
    assert Instance.objects.count() == 3
    response = act(admin_client, "delete_selected", a, b, post="yes")
    assert "Successfully deleted 2 instances." in texts(response)
    assert list(Instance.objects.values_list("name", flat=True)) == ["keep"]


def test_it_says_which_instances_vanished_before_an_action(admin_client: Client) -> None:
    a = make("a", 8100, status="stopped", desired_state="stopped")
    b = make("b", 8101, status="stopped", desired_state="stopped")
    c = make("c", 8102, status="stopped", desired_state="stopped")
    Instance.objects.filter(pk__in=[a.pk, b.pk]).delete()  # by someone else, meanwhile
    response = act(admin_client, "start_selected", a, b, c)
    assert response.status_code == 200
    assert texts(response) == [
        "Cannot start: 2 selected instances no longer exist (deleted meanwhile).",
        "Starting 1 instance: c.",
    ]
    assert Instance.objects.get().status == "pending"
    # All of them gone: Django still runs the action, on nothing; it says so.
    Instance.objects.all().delete()
    response = act(admin_client, "stop_selected", c)
    assert texts(response) == [
        "Cannot stop: 1 selected instance no longer exists (deleted meanwhile)."
    ]


# -- the add form --


def test_it_adds_an_instance_with_the_api_defaults_and_a_free_port(
    admin_client: Client, api: Any, settings: Any
) -> None:
    # What the browser sends for the untouched form: the box is ticked, as the API defaults.
    form = {"name": "admin-made", "model_id": "org/model", "auto_truncate": "on"}
    response = admin_client.post(ADD, form)
    made = Instance.objects.get(name="admin-made")
    assert response.status_code == 302
    assert response["Location"] == page_of(made)
    assert api.post("/instances", {"name": "api-made", "model_id": "org/model"}, format="json")
    via_api = Instance.objects.get(name="api-made")
    config = [
        "model_id", "gpu_id", "max_batch_tokens", "max_concurrent_requests", "pooling",
        "auto_truncate", "startup_timeout_secs", "extra_args", "node", "host", "status",
        "desired_state",
    ]  # fmt: skip
    for field in config:
        assert getattr(made, field) == getattr(via_api, field), field
    tei = settings.TEI
    assert tei.instance_port_start <= made.port <= tei.instance_port_end
    assert tei.prometheus_port_start <= made.prometheus_port <= tei.prometheus_port_end
    assert made.max_batch_tokens == 16384 and made.status == "pending"


def test_it_passes_every_field_to_the_service(admin_client: Client, settings: Any) -> None:
    port = settings.TEI.instance_port_start + 50
    response = admin_client.post(
        ADD,
        {
            "name": "full",
            "model_id": "org/model",
            "pooling": "mean",
            "port": str(port),
            "prometheus_port": str(port + 1),
            "max_batch_tokens": "2048",
            "max_concurrent_requests": "8",
            "startup_timeout_secs": "60",
            "extra_args": "--dtype\nfloat32\n\n",
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    made = Instance.objects.get(name="full")
    assert (made.pooling, made.port, made.prometheus_port) == ("mean", port, port + 1)
    assert (made.max_batch_tokens, made.max_concurrent_requests) == (2048, 8)
    assert made.startup_timeout_secs == 60
    assert made.auto_truncate is False  # an unticked box is "false", as the API reads it
    assert made.extra_args == ["--dtype", "float32"]


def test_it_shows_the_api_validation_errors_on_their_fields(admin_client: Client, api: Any) -> None:
    bad = {"name": "no spaces", "model_id": "org/model", "port": "80", "extra_args": "--port"}
    response = admin_client.post(ADD, bad)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"name", "port", "extra_args"}
    rest = api.post("/instances", {**bad, "extra_args": ["--port"]}, format="json").json()
    assert rest["code"] == "VALIDATION_ERROR"
    assert rest["error"] == f"name: {errors['name'][0]}"
    assert errors["port"] == ["must be between 1024 and 65535"]
    assert errors["extra_args"] == ["--port is set by the manager (the port field)"]
    assert not Instance.objects.exists()


def test_it_requires_a_name_and_a_model(admin_client: Client) -> None:
    response = admin_client.post(ADD, {"name": "", "model_id": ""})
    errors = response.context["adminform"].form.errors
    assert errors == {"name": ["This field is required."], "model_id": ["This field is required."]}


def test_it_puts_a_taken_name_and_port_on_their_fields(admin_client: Client) -> None:
    taken = make("taken", 21000)
    response = admin_client.post(ADD, {"name": "taken", "model_id": "org/model"})
    assert response.context["adminform"].form.errors == {
        "name": ["instance 'taken' already exists"]
    }
    response = admin_client.post(
        ADD, {"name": "fresh", "model_id": "org/model", "port": str(taken.port)}
    )
    assert response.context["adminform"].form.errors == {
        "port": [f"port {taken.port} is already used by another instance"]
    }
    assert Instance.objects.count() == 1


def test_it_refuses_a_gpu_nvml_does_not_list(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_fake_gpus(monkeypatch, [("A", 0, 1, 0), ("B", 0, 1, 0)])
    page = admin_client.get(ADD).content.decode()
    assert "Detected: 0 (A), 1 (B)." in page
    response = admin_client.post(ADD, {"name": "g", "model_id": "org/model", "gpu_id": "2"})
    assert response.context["adminform"].form.errors == {
        "gpu_id": ["no GPU 2: this host has 2 GPU(s)"]
    }
    response = admin_client.post(ADD, {"name": "g", "model_id": "org/model", "gpu_id": "1"})
    assert response.status_code == 302
    assert Instance.objects.get(name="g").gpu_id == 1


def test_it_has_help_text_on_every_add_field(admin_client: Client) -> None:
    form = admin_client.get(ADD).context["adminform"].form
    assert isinstance(form, InstanceCreateForm)
    for name, field in form.fields.items():
        assert len(field.help_text) > 20, name
    assert "Default: 16384." in form.fields["max_batch_tokens"].help_text
    assert form.fields["max_batch_tokens"].widget.attrs["placeholder"] == "16384"
    assert form.fields["auto_truncate"].initial is True


# -- the instance page --


def test_it_shows_read_only_configuration_runtime_facts_and_the_log_tail(
    admin_client: Client, log_dir: Path
) -> None:
    instance = make(
        "page", 8100, status="running", pid=4242, restarts=2, health_check_failures=1,
        started_at=timezone.now() - timedelta(minutes=3), last_health_check=timezone.now(),
        last_error="boom: <script>", extra_args=["--dtype", "float32"],
    )  # fmt: skip
    (log_dir / "page.log").write_text("".join(f"log line {n}\n" for n in range(1, 151)))
    response = admin_client.get(page_of(instance))
    assert response.status_code == 200
    page = response.content.decode()
    assert "View instance" in page
    assert 'name="model_id"' not in page and 'name="port"' not in page
    assert "org/model" in page and "127.0.0.1:8100" in page and "--dtype float32" in page
    for field, value in [("pid", "4242"), ("restarts", "2"), ("health_check_failures", "1")]:
        assert f'data-instance="page" data-field="{field}">{value}<' in page
    assert "boom: &lt;script&gt;" in page
    assert "log line 51\nlog line 52" in page and "log line 150" in page
    assert "log line 50\n" not in page
    assert "Lines 51–150 of 150" in page
    for verb in ("start", "stop", "restart"):
        assert f'action="{page_of(instance, verb + "/")}"' in page
    assert page.count('name="csrfmiddlewaretoken"') >= 4


def test_it_shows_a_page_without_a_log_yet(admin_client: Client) -> None:
    instance = make("fresh", 8100)
    page = admin_client.get(page_of(instance)).content.decode()
    assert "The log is empty." in page


def test_it_starts_stops_and_restarts_from_the_buttons(admin_client: Client) -> None:
    instance = make("a", 8100, status="stopped", desired_state="stopped")
    response = admin_client.post(page_of(instance, "start/"), follow=True)
    assert response.redirect_chain[-1][0] == page_of(instance)
    assert texts(response) == ["Starting 1 instance: a."]
    assert Instance.objects.get().status == "pending"
    Instance.objects.update(status="running")
    assert texts(admin_client.post(page_of(instance, "restart/"), follow=True)) == [
        "Restarting 1 instance: a."
    ]
    Instance.objects.update(status="running")
    assert texts(admin_client.post(page_of(instance, "stop/"), follow=True)) == [
        "Stopping 1 instance: a."
    ]
    assert Instance.objects.get().status == "stopping"
    history = admin_client.get(page_of(instance, "history/")).content.decode()
    assert "Requested stop." in history


def test_it_refuses_a_button_that_does_not_apply(admin_client: Client) -> None:
    instance = make("a", 8100, status="running")
    response = admin_client.post(page_of(instance, "start/"), follow=True)
    assert response.status_code == 200
    assert texts(response) == ["Cannot start: instance 'a' is already running."]
    instance.refresh_from_db()
    assert instance.status == "running"


def test_it_redirects_a_button_for_an_instance_that_is_gone(admin_client: Client) -> None:
    response = admin_client.post(f"{LIST}999/start/", follow=True)
    assert response.status_code == 200
    assert "doesn’t exist" in texts(response)[0]


def test_it_deletes_from_the_instance_page(admin_client: Client) -> None:
    instance = make("a", 8100, status="stopped")
    assert "Are you sure" in admin_client.get(page_of(instance, "delete/")).content.decode()
    response = admin_client.post(page_of(instance, "delete/"), {"post": "yes"}, follow=True)
    assert response.status_code == 200
    assert not Instance.objects.exists()


# -- live refresh --


def test_it_wires_the_live_refresh_to_the_rest_api(admin_client: Client, api: Any) -> None:
    instance = make("a", 8100, status="running")
    listing = admin_client.get(LIST).content.decode()
    assert 'id="tei-live" hidden data-api="/instances"' in listing
    assert "instances/live.js" in listing
    page = admin_client.get(page_of(instance)).content.decode()
    assert 'data-instance="a" data-logs="/instances/a/logs?start=-100"' in page
    assert api.get("/instances").json()[0]["status"] == "running"
    assert api.get("/instances/a/logs?start=-100").json()["lines"] == []
    assert finders.find("instances/live.js") and finders.find("instances/admin.css")


def test_the_instance_page_shows_who_changed_it_and_never_its_key(admin_client: Client) -> None:
    port = 8100
    response = admin_client.post(ADD, {"name": "watched", "model_id": "org/model", "port": port})
    assert response.status_code == 302
    instance = Instance.objects.get(name="watched")
    admin_client.post(page_of(instance, "start/"), follow=True)  # refused: it is pending
    admin_client.post(page_of(instance, "stop/"), follow=True)
    page = admin_client.get(page_of(instance)).content.decode()
    rows = re.findall(r'<tr class="tei-event-(\w+)">(.*?)</tr>', page, re.S)
    cells = [re.findall(r"<td>(.*?)</td>", row, re.S) for _, row in rows]
    assert [(c[1], c[2], c[3], c[4].split(":")[0]) for c in cells] == [
        ("user admin", "127.0.0.1", "stop", "ok"),
        ("user admin", "127.0.0.1", "start", "ALREADY_RUNNING"),
        ("user admin", "127.0.0.1", "create", "ok"),
    ]
    assert [kind for kind, _ in rows] == ["ok", "refused", "ok"]
    assert len(instance.api_key) >= 32 and instance.api_key not in page
