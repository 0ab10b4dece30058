"""`python -m registry.fetch MODEL_ID --revision REV`: download a model's files into the
Hugging Face cache with huggingface_hub, as a child of the download task (so that a
cancel is a signal, and the hub settings of the download stay out of the worker).

Prints one JSON line when it knows what it will fetch (`{"total", "sha"}`)
and one when done (`{"path", "sha"}`); on failure, exit 1 with one line on stderr.
Only what an instance needs is fetched: safetensors weights, the tokenizer, configs and
ONNX files. Files already in the cache are not fetched again.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys

# The files an instance needs: weights as safetensors, configs and tokenizer (JSON, vocab
# text, sentencepiece), pooling/normalize modules, ONNX exports.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.onnx", "*.onnx_data")
# huggingface_hub writes a file in chunks of this size (10 MiB by default): what the task's
# progress (the bytes in the cache) moves by.
PROGRESS_CHUNK_BYTES = 1024 * 1024
OFFLINE = (
    "downloads are off: HF_HUB_OFFLINE=1 and no hub_endpoint (TEI_MANAGER_HUB_ENDPOINT) is "
    "set; set one to download from that hub, or put the files in the Hugging Face cache"
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry.fetch")
    parser.add_argument("model_id")
    parser.add_argument("--revision", default="main")
    args = parser.parse_args(argv)
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    constants.DOWNLOAD_CHUNK_SIZE = PROGRESS_CHUNK_BYTES
    try:
        if constants.HF_HUB_OFFLINE:
            raise OfflineModeIsEnabled(OFFLINE)
        info = HfApi().model_info(args.model_id, revision=args.revision, files_metadata=True)
        wanted = [s for s in info.siblings or [] if wanted_file(s.rfilename)]
        emit(total=sum(s.size or 0 for s in wanted), sha=info.sha or "")
        path = snapshot_download(
            args.model_id, revision=args.revision, allow_patterns=list(ALLOW_PATTERNS)
        )
        emit(path=str(path), sha=info.sha or "")
    except OfflineModeIsEnabled:
        sys.stderr.write(OFFLINE + "\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - the message is the whole report
        first_line = (str(exc).strip().splitlines() or [""])[0]
        sys.stderr.write(f"{type(exc).__name__}: {first_line}\n")
        return 1
    return 0


def wanted_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in ALLOW_PATTERNS)


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
