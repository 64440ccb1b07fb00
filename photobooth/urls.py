from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from studio import views as studio_views
from studio.forms import ResetByEmailForm

urlpatterns = [
    path("admin/rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
    # Before Django's own: the reset form names its field as the site does, a reset lifts a login
    # lockout, and logging out says so.
    path("accounts/password_reset/", auth_views.PasswordResetView.as_view(form_class=ResetByEmailForm),
         name="password_reset"),
    path("accounts/reset/<uidb64>/<token>/", studio_views.PasswordResetConfirm.as_view(), name="password_reset_confirm"),
    path("accounts/logout/", studio_views.LogOut.as_view(), name="logout"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("i18n/", include("django.conf.urls.i18n")),
    path("", include("studio.urls")),
]
