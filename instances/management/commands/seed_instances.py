"""Create the config file's `[[instances]]` on first boot. Each seed is created once: a
seed that an operator deleted later is not brought back. Every seed is validated (by the
create API's serializer) before any is created."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from access.audit import Actor
from instances import services
from instances.api.serializers import validate_seeds
from instances.errors import TeiManagerError
from instances.models import Instance, Seed
from teimanager.config import ConfigError


class Command(BaseCommand):
    help = "Create the [[instances]] of the config file that were never created."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            seeds = validate_seeds(settings.TEI.instances)
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        for index, seed in enumerate(seeds):
            self.stdout.write(seed_instance(index, seed))


def seed_instance(index: int, seed: dict[str, Any]) -> str:
    """Create one validated seed, unless it was created before."""
    name = seed["name"]
    if Seed.objects.filter(name=name).exists():
        return f"Seed '{name}' was created before; skipped."
    if Instance.objects.filter(name=name).exists():
        Seed.objects.create(name=name)
        return f"Instance '{name}' exists already; seed recorded."
    try:
        services.create_instance(Actor.command(), **seed)
    except TeiManagerError as exc:
        raise CommandError(f"config key 'instances[{index}]' ({name}): {exc.message}") from None
    Seed.objects.create(name=name)
    return f"Created instance '{name}' ({seed['model_id']})."
