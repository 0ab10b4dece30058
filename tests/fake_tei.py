"""A stand-in for text-embeddings-router in process tests (TEI_BINARY_PATH points at a
script that runs this). What it does depends on the model id:

- `crash/...`: prints an error and exits 1 at once (a crash-looping binary);
- `hang/...`: never becomes healthy (a start that outlives its timeout);
- `chatty/<n>`: writes n numbered lines (`line 000001 ...`) at once, then serves as below,
  and writes a last line, `stopped after <n> lines`, on SIGTERM;
- anything else: serves grpc.health.v1 (SERVING) on --port until SIGTERM.

Like text-embeddings-router, it first prints its arguments, its API key (API_KEY) among
them: the manager must keep that out of the log.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)
    print(f"fake-tei {' '.join(argv)}", flush=True)
    api_key = os.environ.get("API_KEY")
    print(f"Args {{ model_id: {args.model_id!r}, api_key: {api_key!r} }}", flush=True)
    if args.model_id.startswith("crash/"):
        print(f"Error: could not load model {args.model_id}: weights are corrupt", flush=True)
        sys.exit(1)
    if args.model_id.startswith("hang/"):
        while True:
            time.sleep(1)
    goodbye = ""
    if args.model_id.startswith("chatty/"):
        count = int(args.model_id.split("/", 1)[1])
        sys.stdout.writelines(f"line {i:06d} {'x' * 40}\n" for i in range(1, count + 1))
        sys.stdout.flush()
        goodbye = f"stopped after {count} lines"
    serve_health(args.port)
    if goodbye:
        print(goodbye, flush=True)


def serve_health(port: int) -> None:
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"Ready on {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main(sys.argv[1:])
