"""Give a fresh install a way in: create an ``admin`` superuser once and print its password."""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the 'admin' superuser if no superuser exists, and print where its password is."

    def handle(self, *args: object, **options: object) -> None:
        User = get_user_model()
        secret_file = settings.DATA_DIR / "admin-password.txt"
        if not User.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser("admin", "admin@localhost", password)
            secret_file.write_text(password + "\n")
            secret_file.chmod(0o600)
        if secret_file.exists():
            self.stdout.write(f"log in as admin / {secret_file.read_text().strip()} (kept in {secret_file})")
