"""`python manage.py benchclient`: load the multiplexer, print the result as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from multiplexer.benchclient import Endpoint, generate_texts, run_arrow, run_standard


class Command(BaseCommand):
    help = "Benchmark embeddings through the multiplexer (standard or Arrow mode); prints JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "-e", "--endpoint", required=True, help="host:port, http:// or https://"
        )
        parser.add_argument("-i", "--instance", required=True, help="instance name to target")
        parser.add_argument("-m", "--mode", choices=("standard", "arrow"), default="standard")
        parser.add_argument("-n", "--num-texts", type=int, default=10000)
        parser.add_argument(
            "-b",
            "--batch-size",
            type=int,
            default=100,
            help="standard: calls in flight; arrow: texts per request",
        )
        parser.add_argument("--cert", help="client certificate (PEM) for mTLS")
        parser.add_argument("--key", help="client key (PEM) for mTLS")
        parser.add_argument("--ca", help="CA certificate (PEM) that signed the server's")
        parser.add_argument(
            "--insecure", action="store_true", help="accept a server certificate for localhost"
        )
        parser.add_argument("--noop", action="store_true", help="arrow: dummy vectors, no model")
        parser.add_argument("--max-message-size-mb", type=int, default=100)

    def handle(self, *args: Any, **options: Any) -> None:
        if bool(options["cert"]) != bool(options["key"]):
            raise CommandError("--cert and --key go together")
        if options["noop"] and options["mode"] != "arrow":
            raise CommandError("--noop applies to --mode arrow only: standard calls run the model")
        if options["num_texts"] < 1 or options["batch_size"] < 1:
            raise CommandError("--num-texts and --batch-size must be at least 1")
        endpoint = Endpoint.parse(
            options["endpoint"],
            ca=options["ca"],
            cert=options["cert"],
            key=options["key"],
            insecure=options["insecure"],
            max_message_size_mb=options["max_message_size_mb"],
        )
        texts = generate_texts(options["num_texts"])
        with tqdm(total=len(texts), unit="text", file=sys.stderr) as bar:
            if options["mode"] == "arrow":
                work = run_arrow(
                    endpoint,
                    options["instance"],
                    texts,
                    options["batch_size"],
                    options["noop"],
                    bar.update,
                )
            else:
                work = run_standard(
                    endpoint, options["instance"], texts, options["batch_size"], bar.update
                )
            result = asyncio.run(work)
        self.stdout.write(json.dumps(result.as_dict(), indent=2))
