from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from media_app import views
from media_app.api import views as api_views
from media_app.graphql.schema import schema
from media_app.graphql.views import MediaGraphQLView

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("accounts/login/", views.login, name="login"),
    path("accounts/logout/", views.logout, name="logout"),
    # A DASH folder under one signed token: the player resolves segment names against the manifest.
    path("api/dash/<str:token>/<str:name>", api_views.dash_file, name="media-dash"),
    path("api/", include("media_app.api.urls")),
    # CSRF is checked by REST's session authentication inside the view (token clients need none).
    path("graphql/", csrf_exempt(MediaGraphQLView.as_view(schema=schema)), name="graphql"),
]
