"""ASGI entry point: HTTP goes to Django behind the body limits, /ws/jobs/ to the jobs consumer."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "photobooth.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from photobooth.body_limits import BodyLimits  # noqa: E402
from studio.consumers import JobsConsumer  # noqa: E402

websocket_urlpatterns = [path("ws/jobs/", JobsConsumer.as_asgi())]

application = ProtocolTypeRouter(
    {
        "http": BodyLimits(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
