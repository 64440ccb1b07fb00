from django.urls import path

from studio import views

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup"),
    path("account/", views.account, name="account"),
    path("personas/new/", views.persona_create, name="persona_create"),
    path("personas/<int:persona_id>/", views.persona_detail, name="persona"),
    path("media/<path:path>", views.media_file, name="media_file"),
    path("healthz", views.healthz, name="healthz"),
]
