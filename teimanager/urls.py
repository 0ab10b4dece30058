"""URL map: REST API at the root (DESIGN.md's table), the admin, metrics, the OpenAPI schema."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    path("admin", RedirectView.as_view(url="/admin/", permanent=True)),
    path("admin/", admin.site.urls),
    path("api/schema", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("instances.api.urls")),
    path("", include("nodes.api.urls")),
    path("", include("registry.urls")),
]

handler400 = "instances.api.errors.bad_request"
handler404 = "instances.api.errors.not_found"
handler500 = "instances.api.errors.server_error"
