"""gunicorn settings for `web`: the port comes from the TEI Manager config (api_port /
TEI_MANAGER_API_PORT); 127.0.0.1 unless TEI_MANAGER_BIND says otherwise. A bad value
stops gunicorn here, in the master, with one line and exit status 2."""

from teimanager.config import load_config_or_exit

_config = load_config_or_exit()

bind = f"{_config.bind}:{_config.api_port}"
workers = _config.web_workers
threads = 4
accesslog = "-"
timeout = 60


def child_exit(server: object, worker: object) -> None:
    # Several gunicorn workers share the metrics files in PROMETHEUS_MULTIPROC_DIR.
    if _config.prometheus_multiproc_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
