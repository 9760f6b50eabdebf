from django.urls import include, path

from media_app import views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("api/", include("media_app.api.urls")),
]
