"""What models this host has, found at start: the Hugging Face cache (read offline, a
missing cache is no error), the models shipped as Python packages, and the config file's
`[[models]]`. Idempotent: a model already registered is left as it is, except that one
whose files have appeared since is marked downloaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError

from registry.models import Model, ModelStatus, Source
from registry.serializers import validate_model_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    model_id: str
    source: str
    size: int
    sha: str = ""


def discover(cache_dir: str | Path | None = None) -> list[str]:
    """Register what is found; returns the model ids registered now."""
    added = []
    for found in [*in_hf_cache(cache_dir), *packaged()]:
        if _record(found):
            added.append(found.model_id)
    for entry in validate_model_entries(settings.TEI.models):
        if not Model.objects.filter(model_id=entry["model_id"]).exists():
            try:
                Model.objects.create(source=Source.CONFIG, **entry)
            except IntegrityError:
                continue  # registered by a concurrent discovery
            added.append(entry["model_id"])
    if added:
        log.info("registered %d model(s) found on this host: %s", len(added), ", ".join(added))
    return added


def in_hf_cache(cache_dir: str | Path | None = None) -> list[Found]:
    """Every model repo of the cache with a snapshot an instance can load (a config.json)."""
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir(cache_dir)
    except Exception as exc:  # noqa: BLE001 - no cache, or one that cannot be read
        log.info("no Hugging Face cache to scan: %s", exc)
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        loadable = [
            revision
            for revision in repo.revisions
            if any(f.file_name == "config.json" for f in revision.files)
        ]
        if loadable:
            newest = max(loadable, key=lambda r: r.last_modified)
            found.append(Found(repo.repo_id, Source.CACHE, repo.size_on_disk, newest.commit_hash))
    return found


def packaged() -> list[Found]:
    from localtei.lookup import PACKAGED_MODELS, _find_packaged
    from registry.services import directory_size

    found = []
    for model_id in sorted(PACKAGED_MODELS):
        location = _find_packaged(model_id)
        if location is not None:
            found.append(Found(model_id, Source.PACKAGED, directory_size(location.path)))
    return found


def _record(found: Found) -> bool:
    on_disk = {"size_on_disk": found.size, "commit_sha": found.sha}
    updated = Model.objects.filter(model_id=found.model_id, status=ModelStatus.AVAILABLE).update(
        status=ModelStatus.DOWNLOADED, last_error="", **on_disk
    )
    if updated or Model.objects.filter(model_id=found.model_id).exists():
        return False
    try:
        Model.objects.create(
            model_id=found.model_id, source=found.source, status=ModelStatus.DOWNLOADED, **on_disk
        )
    except IntegrityError:
        return False
    return True
