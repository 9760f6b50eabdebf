from django.urls import path

from media_app.consumers import MediaItemConsumer, MediaListConsumer

websocket_urlpatterns = [
    path("ws/media/", MediaListConsumer.as_asgi()),
    path("ws/media/<str:item_id>/", MediaItemConsumer.as_asgi()),
]
