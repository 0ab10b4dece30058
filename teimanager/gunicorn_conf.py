"""gunicorn settings for `web`: the port comes from the TEI Manager config (api_port /
TEI_MANAGER_API_PORT); 127.0.0.1 unless TEI_MANAGER_BIND says otherwise. A bad value
stops gunicorn here, in the master, with one line and exit status 2.

The worker is asyncio (gunicorn's ASGI worker running Django's ASGI application): a
connection waiting for a slow client costs a coroutine, not a thread, so clients that
dribble their headers cannot take every worker away from /health. Views still run in
threads (Django runs sync code in a thread per request). In production, put a buffering
proxy in front anyway (docker/nginx.conf): it bounds how long a client may take.
"""

from teimanager.config import load_config_or_exit
from telemetry.logs import gunicorn_logging_config

_config = load_config_or_exit()

wsgi_app = "teimanager.asgi:application"
bind = f"{_config.bind}:{_config.api_port}"
worker_class = "teimanager.gunicorn_worker.Worker"
workers = _config.web_workers
# Open connections per worker, idle or slow ones included.
worker_connections = 1000
# A worker whose event loop stops answering for this long is replaced.
timeout = 30
graceful_timeout = 20
# Seconds an idle kept-alive connection stays open.
keepalive = 5
# Django has no ASGI lifespan events.
asgi_lifespan = "off"
accesslog = "-"
if _config.log_format == "json":
    # gunicorn's error and access lines as JSON, like every other line of the stack.
    logconfig_dict = gunicorn_logging_config(_config.log_format, _config.log_level)
# No control socket: its default path is per user, so two servers on a host would share it.
control_socket_disable = True


def child_exit(server: object, worker: object) -> None:
    # Several gunicorn workers share the metrics files in PROMETHEUS_MULTIPROC_DIR.
    if _config.prometheus_multiproc_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
