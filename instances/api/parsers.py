"""The API's one parser: DRF's JSON parser, for which a document nested too deep is the
client's mistake (400 MALFORMED_JSON), not Python's RecursionError (500).

A body over DATA_UPLOAD_MAX_MEMORY_SIZE never gets here: DRF reads `request.body`, where
Django refuses it (413 REQUEST_TOO_LARGE, through handler400).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(
        self,
        stream: IO[bytes],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON nested too deeply") from None
