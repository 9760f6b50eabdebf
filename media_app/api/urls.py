from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from media_app.api import tus, views, whip

app_name = "api"

urlpatterns = [
    path("media/", views.MediaListCreateApi.as_view(), name="media-list"),
    path("media/<str:item_id>", views.MediaDetailApi.as_view(), name="media-detail"),
    path("media/<str:item_id>/complete", views.MediaCompleteApi.as_view(), name="media-complete"),
    path("media/<str:item_id>/retry", views.MediaRetryApi.as_view(), name="media-retry"),
    path("uploads/<str:token>", views.upload_put, name="upload-put"),
    path("files/<str:token>", views.file_download, name="file"),
    path("tus/", tus.TusCreateApi.as_view(), name="tus"),
    path("tus/<str:item_id>", tus.TusUploadApi.as_view(), name="tus-upload"),
    # WebRTC ingest (RFC 9725): POST an SDP offer; DELETE the session's URL to end it.
    path("whip/", whip.WhipApi.as_view(), name="whip"),
    path("whip/<str:item_id>", whip.WhipSessionApi.as_view(), name="whip-session"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    # Swagger UI over the schema, from our own static files (drf-spectacular-sidecar), no CDN.
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]
