"""Give a fresh install a way in: create an ``admin`` superuser once, and print its password then.

The password is printed only by the run that creates the account (and kept, readable by this
user only, in ``DATA_DIR/admin-password.txt``); later runs say where it is, never what it is, so
it does not land in every terminal scrollback and log of ``make run``.
"""

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the 'admin' superuser if no superuser exists, printing its password that one time."

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        secret_file = settings.DATA_DIR / "admin-password.txt"
        if User.objects.filter(is_superuser=True).exists():
            where = f" (its password was kept in {secret_file})" if secret_file.exists() else ""
            self.stdout.write(f"an admin account exists; log in at /admin/{where}")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "admin@localhost", password)
        secret_file.write_text(password + "\n")
        secret_file.chmod(0o600)
        self.stdout.write(f"created the admin account: log in as admin / {password} (also kept in {secret_file})")
