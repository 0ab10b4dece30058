from typing import Any

from django.core.management.base import BaseCommand

from registry.discovery import discover


class Command(BaseCommand):
    help = "Register the models of the HF cache, the packaged ones and the config's [[models]]."

    def handle(self, *args: Any, **options: Any) -> None:
        added = discover()
        self.stdout.write(
            f"Registered {len(added)} model(s)" + (f": {', '.join(added)}" if added else ".")
        )
