"""Create the admin superuser once: from DJANGO_SUPERUSER_USERNAME / _PASSWORD, or with a
generated password that is printed this one time."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin superuser if there is none."

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            self.stdout.write("A superuser exists already.")
            return
        username = settings.TEI.superuser_username
        password = settings.TEI.superuser_password
        generated = not password
        if generated:
            password = secrets.token_urlsafe(12)
        email = settings.TEI.superuser_email
        users.objects.create_superuser(username=username, email=email, password=password)
        if generated:
            self.stdout.write(
                self.style.WARNING(
                    f"Created superuser '{username}' with password: {password}\n"
                    "It is shown only this once; set DJANGO_SUPERUSER_PASSWORD to choose one."
                )
            )
        else:
            self.stdout.write(f"Created superuser '{username}'.")
