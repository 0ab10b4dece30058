"""The API's one parser: DRF's JSON parser with the limits Django applies to forms.

DRF reads the body from the stream itself, so DATA_UPLOAD_MAX_MEMORY_SIZE, which Django
checks in `request.body`, never applied; and Python's decoder answers a document nested a
few thousand levels deep with RecursionError. Both are the client's fault: 413 and 400.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError

from instances.errors import RequestTooLarge


class JSONParser(parsers.JSONParser):
    def parse(
        self,
        stream: IO[bytes],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(raw) > limit:
            raise RequestTooLarge(f"the request body is over {limit} bytes")
        try:
            return super().parse(io.BytesIO(raw), media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON nested too deeply") from None
