"""Registry routes. Model ids hold '/' (org/name): the action routes come first, and the
detail route takes the rest of the path."""

from django.urls import path

from registry import views

urlpatterns = [
    path("models", views.ModelList.as_view(), name="model-list"),
    path("models/<path:model_id>/download", views.DownloadModel.as_view(), name="model-download"),
    path("models/<path:model_id>/cancel", views.CancelDownload.as_view(), name="model-cancel"),
    path("models/<path:model_id>/verify", views.VerifyModel.as_view(), name="model-verify"),
    path("models/<path:model_id>", views.ModelDetail.as_view(), name="model-detail"),
]
