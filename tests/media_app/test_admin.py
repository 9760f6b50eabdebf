import pytest

from media_app.services import media_item_create
from tests.states import set_state

pytestmark = pytest.mark.django_db


def test_admin_lists_items_with_status_kind_stage_progress_and_owner(client, make_user):
    owner = make_user("alice")
    item = media_item_create(owner=owner, original_name="holiday.mp4")
    set_state(item_id=item.pk, status="Processing", stage="encode", progress=42, extra={"kind": "video"})
    admin = make_user("boss", staff=True)
    admin.is_superuser = True
    admin.save()
    client.force_login(admin)

    page = client.get("/admin/media_app/mediaitem/").content.decode()

    assert "holiday.mp4" in page
    for text in ("Processing", "video", "encode", "42", "alice"):
        assert text in page
