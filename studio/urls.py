from django.urls import path

from studio import views

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup"),
    path("account/", views.account, name="account"),
    path("personas/new/", views.persona_create, name="persona_create"),
    path("personas/<int:persona_id>/", views.persona_detail, name="persona"),
    path("personas/<int:persona_id>/consent/", views.face_consent, name="face_consent"),
    path("personas/<int:persona_id>/photos/", views.photo_upload, name="photo_upload"),
    path("photos/<int:photo_id>/delete/", views.photo_delete, name="photo_delete"),
    path("media/<path:path>", views.media_file, name="media_file"),
    path("healthz", views.healthz, name="healthz"),
]
