"""Middleware for htmx requests that Django would answer with a whole page."""

from __future__ import annotations

from typing import Callable
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import resolve_url
from django.utils.translation import gettext as _
from django_htmx.http import HttpResponseClientRedirect


def htmx_login_redirect(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable[[HttpRequest], HttpResponse]:
    """A signed-out htmx request (the session ended, or the person logged out in another tab) sends
    the whole window to the login page, then back to the page it came from. Followed by the
    browser, the plain redirect put the login page inside the panel that asked. An action (not a
    poll) says on the login page that it was not done: the files chosen for an upload are gone."""

    def middleware(request: HttpRequest) -> HttpResponse:
        response = get_response(request)
        if (
            request.htmx
            and response.status_code == 302
            and urlsplit(response["Location"]).path == resolve_url(settings.LOGIN_URL)
        ):
            back_to = request.htmx.current_url_abs_path or resolve_url(settings.LOGIN_REDIRECT_URL)
            if request.method != "GET":
                messages.warning(request, _("You were logged out, so that was not done. Please log in and try again."))
            return HttpResponseClientRedirect(redirect_to_login(back_to)["Location"])
        return response

    return middleware
