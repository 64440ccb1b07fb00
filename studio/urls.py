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
    path("personas/<int:persona_id>/photos/refused/delete/", views.refused_photos_delete, name="refused_photos_delete"),
    path("personas/<int:persona_id>/person/", views.person_choose, name="person_choose"),
    path("personas/<int:persona_id>/build/", views.persona_build, name="persona_build"),
    path("personas/<int:persona_id>/delete/", views.persona_delete, name="persona_delete"),
    path("jobs/panel/", views.jobs_panel, name="jobs_panel"),
    path("jobs/<int:job_id>/cancel/", views.job_cancel, name="job_cancel"),
    path("jobs/<int:job_id>/retry/", views.job_retry, name="job_retry"),
    path("jobs/<int:job_id>/dismiss/", views.job_dismiss, name="job_dismiss"),
    path("gallery/", views.gallery, name="gallery"),
    path("gallery/new/", views.template_new, name="template_new"),
    path("portraits/new/", views.portraits_request, name="portraits_request"),
    path("album/", views.album, name="album"),
    path("album/<int:persona_id>/zip/", views.album_zip, name="album_zip"),
    path("album/<int:persona_id>/delete/", views.album_delete, name="album_delete"),
    path("portraits/<int:portrait_id>/", views.portrait_detail, name="portrait"),
    path("portraits/<int:portrait_id>/download/", views.portrait_download, name="portrait_download"),
    path("portraits/<int:portrait_id>/delete/", views.portrait_delete, name="portrait_delete"),
    path("account/delete/", views.delete_data, name="delete_data"),
    path("media/<path:path>", views.media_file, name="media_file"),
    path("healthz", views.healthz, name="healthz"),
]
