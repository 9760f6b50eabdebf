from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from media_app.selectors import media_items_for_user


@login_required
def home(request: HttpRequest) -> HttpResponse:
    items = media_items_for_user(user=request.user)[:50]
    return render(request, "media_app/home.html", {"items": items})


def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True})
