"""Management commands: seed_instances, ensure_superuser, and a check (NetBox style)
that every command of this project has a test."""

from __future__ import annotations

import dataclasses
import re
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command, get_commands

from instances.models import Instance, Seed

pytestmark = pytest.mark.django_db

SEEDS = ({"name": "minilm", "model_id": "sentence-transformers/all-MiniLM-L6-v2"},)


def run(*args: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_it_seeds_instances_once(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, instances=SEEDS)
    assert "Created instance 'minilm'" in run("seed_instances")
    instance = Instance.objects.get(name="minilm")
    assert instance.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert instance.status == "pending"
    assert "skipped" in run("seed_instances")
    assert Instance.objects.count() == 1


def test_it_does_not_bring_back_a_deleted_seed(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, instances=SEEDS)
    run("seed_instances")
    Instance.objects.all().delete()
    run("seed_instances")
    assert not Instance.objects.exists()
    assert Seed.objects.filter(name="minilm").exists()


def test_it_names_the_seed_that_is_invalid(settings: Any) -> None:
    bad = ({"name": "ok", "model_id": "m"}, {"name": "bad", "model_id": "--oops"})
    settings.TEI = dataclasses.replace(settings.TEI, instances=bad)
    with pytest.raises(CommandError, match=r"instances\[1\].*model_id"):
        run("seed_instances")


def test_a_seed_takes_every_create_field(settings: Any) -> None:
    seed = {
        "name": "tuned",
        "model_id": "org/model",
        "auto_truncate": False,
        "pooling": "mean",
        "max_batch_tokens": 2048,
        "max_concurrent_requests": 8,
        "startup_timeout_secs": 60,
        "extra_args": ["--dtype", "float32"],
    }
    settings.TEI = dataclasses.replace(settings.TEI, instances=(seed,))
    run("seed_instances")
    instance = Instance.objects.get(name="tuned")
    assert {key: getattr(instance, key) for key in seed} == seed


@pytest.mark.parametrize(
    ("seeds", "key"),
    [
        (({"name": "a"},), "instances[0].model_id"),
        (({"name": "a", "model_id": "m", "colour": "red"},), "instances[0].colour"),
        (({"name": "a", "model_id": "m", "auto_truncate": "so"},), "instances[0].auto_truncate"),
        (({"name": "a", "model_id": "m", "extra_args": ["-p", "1"]},), "instances[0].extra_args"),
        (({"name": "a", "model_id": "m"}, {"name": "a", "model_id": "n"}), "instances[1].name"),
    ],
)
def test_it_names_the_key_of_a_bad_seed_and_creates_none(
    settings: Any, seeds: tuple[dict[str, Any], ...], key: str
) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, instances=seeds)
    with pytest.raises(CommandError, match=re.escape(f"config key '{key}'")):
        run("seed_instances")
    assert not Instance.objects.exists()


def test_it_creates_the_superuser_from_the_environment(settings: Any) -> None:
    settings.TEI = dataclasses.replace(
        settings.TEI, superuser_username="boss", superuser_password="s3cret-pass"
    )
    assert "Created superuser 'boss'" in run("ensure_superuser")
    user = get_user_model().objects.get(username="boss")
    assert user.is_superuser and user.check_password("s3cret-pass")
    assert "exists already" in run("ensure_superuser")


def test_it_generates_and_prints_a_password_once(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, superuser_username="admin")
    output = run("ensure_superuser")
    password = re.search(r"password: (\S+)", output)
    assert password is not None
    assert get_user_model().objects.get(username="admin").check_password(password.group(1))
    assert "password" not in run("ensure_superuser")


def test_it_has_a_test_for_every_management_command() -> None:
    ours = sorted(
        name
        for name, app in get_commands().items()
        if app in ("instances", "registry", "multiplexer", "access")
    )
    assert {"seed_instances", "ensure_superuser", "apikey"} <= set(ours)
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = [
        name
        for name in ours
        if not re.search(
            rf"""(call_command|run)\(\s*["']{name}["']|manage\.py["',\s]+{name}\b""", tests
        )
    ]
    assert not untested, f"management commands without a test: {untested}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "standard", "--noop"], "--noop applies to --mode arrow only"),
        (["--cert", "client.pem"], "--cert and --key go together"),
        (["--num-texts", "0"], "at least 1"),
    ],
)
def test_benchclient_refuses_contradictory_options(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("benchclient", "-e", "127.0.0.1:1", "-i", "minilm", *args)


def test_every_model_change_has_its_migration() -> None:
    # A model changed without its migration would leave the database behind the code.
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
