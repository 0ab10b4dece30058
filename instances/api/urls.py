"""REST API routes (DESIGN.md's table): no trailing slashes."""

from django.urls import path

from instances.api import views

urlpatterns = [
    path("health", views.health, name="health"),
    path("metrics", views.metrics, name="metrics"),
    path("instances", views.InstanceList.as_view(), name="instance-list"),
    path("instances/<str:name>", views.InstanceDetail.as_view(), name="instance-detail"),
    path("instances/<str:name>/start", views.StartInstance.as_view(), name="instance-start"),
    path("instances/<str:name>/stop", views.StopInstance.as_view(), name="instance-stop"),
    path("instances/<str:name>/restart", views.RestartInstance.as_view(), name="instance-restart"),
    path("instances/<str:name>/logs", views.InstanceLogs.as_view(), name="instance-logs"),
    path("instances/<str:name>/events", views.InstanceEvents.as_view(), name="instance-events"),
]
