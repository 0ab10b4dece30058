"""gunicorn settings for `web`: the port comes from the TEI Manager config (api_port /
TEI_MANAGER_API_PORT); 127.0.0.1 unless TEI_MANAGER_BIND says otherwise."""

import os

from teimanager.config import load_config

bind = f"{os.environ.get('TEI_MANAGER_BIND', '127.0.0.1')}:{load_config().api_port}"
workers = int(os.environ.get("TEI_MANAGER_WEB_WORKERS", "2"))
threads = 4
accesslog = "-"
timeout = 60


def child_exit(server: object, worker: object) -> None:
    # Several gunicorn workers share the metrics files in PROMETHEUS_MULTIPROC_DIR.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
