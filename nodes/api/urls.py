"""REST routes of the node registry: no trailing slashes."""

from django.urls import path

from nodes.api import views

urlpatterns = [
    path("nodes", views.NodeList.as_view(), name="node-list"),
    path("nodes/<str:name>", views.NodeDetail.as_view(), name="node-detail"),
]
