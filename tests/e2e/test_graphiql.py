"""GraphiQL at /graphql/ in headless Chromium, with the browser's network limited to the site.

A staff user logs in, opens /graphql/, runs a query and reads the answer; GraphiQL and React
come from our static files, and a route that aborts every request to another host proves that
nothing was even attempted elsewhere (the product runs on closed networks).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import PASSWORD

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


def confine_to(page: Any, origin: str) -> list[str]:
    """Abort every request not to ``origin``; the list collects what was attempted elsewhere."""
    elsewhere: list[str] = []

    def handle(route: Any) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or f"{urlsplit(url).scheme}://{urlsplit(url).netloc}" == origin:
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    page.context.route("**/*", handle)
    return elsewhere


@pytest.fixture
def staff_user(make_user: Any) -> Any:
    return make_user(staff=True, password=PASSWORD)


def test_staff_log_in_and_run_a_query_in_graphiql_served_from_the_site(
    staff_user, e2e_user, asgi_server, page, shots, traffic
):
    elsewhere = confine_to(page, asgi_server.url)

    # Not logged in: no GraphiQL, but the answer says who may use it and where to log in.
    answer = page.request.get("/graphql/", headers={"Accept": "text/html"})
    assert answer.status == 404 and "/accounts/login/?next=/graphql/" in answer.text()

    page.goto("/accounts/login/?next=/graphql/")
    page.get_by_label("Username").fill(staff_user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/graphql/")
    page.wait_for_selector("html[data-ready]")
    editor = page.locator(".graphiql-query-editor")
    expect(editor).to_be_visible()
    expect(editor).to_contain_text("mediaItems")
    shots.take(page, "graphiql-loaded", full_page=False)

    page.get_by_role("button", name="Execute query (Ctrl-Enter)").click()
    result = page.locator(".graphiql-response")
    expect(result).to_contain_text('"totalCount": 0', timeout=30_000)
    shots.take(page, "query-answered", full_page=False)

    assert elsewhere == [], f"requests to other hosts: {elsewhere}"
    assert traffic.hosts() == {"127.0.0.1"}
    assert traffic.errors == []
    posts = [r for r in traffic.responses if r.request.method == "POST" and urlsplit(r.url).path == "/graphql/"]
    assert posts and all(r.status == 200 for r in posts)

    # A user who is not staff is told so (403), not shown the IDE.
    page.context.clear_cookies()
    page.goto("/accounts/login/?next=/graphql/")
    page.get_by_label("Username").fill(e2e_user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/graphql/")
    expect(page.locator("body")).to_contain_text("GraphiQL is open to staff accounts")


def test_swagger_ui_lists_the_tus_endpoint_served_from_the_site(logged_in_page, asgi_server, shots, traffic):
    """Swagger UI at /api/docs/ in the browser: its scripts are ours, and the schema it renders
    has every way in, the tus upload included."""
    page = logged_in_page
    elsewhere = confine_to(page, asgi_server.url)

    page.goto("/api/docs/")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("cpc-media", timeout=30_000)
    tus = page.locator(".opblock-summary-path", has_text="/api/tus/")
    expect(tus.first).to_be_visible()
    expect(page.locator(".opblock-summary-path", has_text="/api/uploads/").first).to_be_visible()
    tus.first.scroll_into_view_if_needed()
    shots.take(page, "swagger-ui-tus", full_page=False)

    assert elsewhere == [], f"requests to other hosts: {elsewhere}"
    assert traffic.hosts() == {"127.0.0.1"}
    assert traffic.errors == []
