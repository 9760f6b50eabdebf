"""``manage.py ensure_admin`` as ``make run`` calls it on every start: the password once, then never."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def ensure_admin() -> str:
    out = StringIO()
    call_command("ensure_admin", stdout=out)
    return out.getvalue()


def test_the_password_is_printed_only_by_the_run_that_creates_the_admin(settings: Any, tmp_path: Path) -> None:
    settings.DATA_DIR = tmp_path
    first = ensure_admin()
    password = (tmp_path / "admin-password.txt").read_text().strip()
    assert password in first and "created the admin account" in first
    assert get_user_model().objects.get(username="admin").check_password(password)
    assert (tmp_path / "admin-password.txt").stat().st_mode & 0o777 == 0o600

    again = ensure_admin()
    assert password not in again
    assert str(tmp_path / "admin-password.txt") in again
    assert get_user_model().objects.filter(is_superuser=True).count() == 1
