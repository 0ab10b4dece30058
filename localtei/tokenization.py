"""Tokenize as TEI does: validate length, truncate on request, prepend prompts, list tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from localtei.errors import ServingError, StartupError, TokenizerError, ValidationError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Encoded:
    """One tokenized input (a text or a text pair), ready for the batcher."""

    ids: list[int]
    type_ids: list[int]
    chars: int


@dataclass(frozen=True, slots=True)
class TextInput:
    """A text (or a text pair) to tokenize, with the request's truncation and prompt."""

    text: str
    pair: str | None = None
    truncate: bool = False
    left: bool = False  # truncate from the left
    prompt: str | None = None


@dataclass(slots=True)
class TokenInfo:
    """TEI's SimpleToken: special tokens carry their token text and no offsets."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TextTokenizer:
    """A fast tokenizer plus the limits and prompts of the model it belongs to."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_input_length: int,
        prompts: dict[str, str] | None = None,
        default_prompt: str | None = None,
    ) -> None:
        self.max_input_length = max_input_length
        self.prompts = prompts or {}
        self.default_prompt = default_prompt
        # Truncation is state on a Tokenizer, so keep one copy per mode instead of toggling.
        self._plain = _copy(tokenizer)
        self._right = _copy(tokenizer)
        self._right.enable_truncation(max_input_length, direction="right")
        self._left = _copy(tokenizer)
        self._left.enable_truncation(max_input_length, direction="left")

    @classmethod
    def from_model_dir(
        cls,
        path: Path,
        max_input_length: int,
        prompts: dict[str, str] | None = None,
        default_prompt: str | None = None,
    ) -> TextTokenizer:
        return cls(_load_tokenizer(path), max_input_length, prompts, default_prompt)

    def prompt(self, prompt_name: str | None) -> str | None:
        """The text to put before the input: the named prompt, else the default one."""
        if prompt_name is None:
            return self.default_prompt
        try:
            return self.prompts[prompt_name]
        except KeyError:
            available = ", ".join(sorted(self.prompts)) or "none"
            raise ValidationError(
                f"prompt name `{prompt_name}` not found in the model's "
                f"config_sentence_transformers.json prompts (available: {available})"
            ) from None

    def encode_many(self, inputs: Sequence[TextInput]) -> list[Encoded | ServingError]:
        """Tokenize many inputs in one call into the Rust tokenizer, which releases the GIL
        while it works; each input gets its `Encoded` or the error `encode` would raise."""
        results: list[Encoded | ServingError | None] = [None] * len(inputs)
        by_tokenizer: dict[int, list[int]] = {}
        for index, item in enumerate(inputs):
            if not item.text or (item.pair is not None and not item.pair):
                results[index] = ValidationError("`inputs` cannot be empty")
                continue
            tokenizer = self._tokenizer_for(item.truncate, item.left)
            by_tokenizer.setdefault(id(tokenizer), []).append(index)
        for indices in by_tokenizer.values():
            first = inputs[indices[0]]
            tokenizer = self._tokenizer_for(first.truncate, first.left)
            texts = [_full_text(inputs[i]) for i in indices]
            batch = [
                text if inputs[i].pair is None else (text, inputs[i].pair)
                for i, text in zip(indices, texts, strict=True)
            ]
            try:
                encodings = tokenizer.encode_batch(batch, add_special_tokens=True)
            except Exception:  # noqa: BLE001 - one bad input: find it by encoding each alone
                for i in indices:
                    item = inputs[i]
                    try:
                        results[i] = self.encode(
                            item.text,
                            item.pair,
                            truncate=item.truncate,
                            left=item.left,
                            prompt=item.prompt,
                        )
                    except ServingError as err:
                        results[i] = err
                continue
            for i, text, encoding in zip(indices, texts, encodings, strict=True):
                pair = inputs[i].pair
                results[i] = self._checked(encoding, len(text) + (len(pair) if pair else 0))
        return results  # type: ignore[return-value]

    def encode(
        self,
        text: str,
        pair: str | None = None,
        *,
        truncate: bool = False,
        left: bool = False,
        prompt: str | None = None,
    ) -> Encoded:
        """Tokenize with special tokens; over-long input is truncated or rejected."""
        if not text or (pair is not None and not pair):
            raise ValidationError("`inputs` cannot be empty")
        if prompt:
            text = prompt + text
        tokenizer = self._tokenizer_for(truncate, left)
        try:
            encoding = tokenizer.encode(text, pair, add_special_tokens=True)
        except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
            raise TokenizerError(f"tokenizer error: {exc}") from exc
        result = self._checked(encoding, len(text) + (len(pair) if pair is not None else 0))
        if isinstance(result, ServingError):
            raise result
        return result

    def _tokenizer_for(self, truncate: bool, left: bool) -> Tokenizer:
        return (self._left if left else self._right) if truncate else self._plain

    def _checked(self, encoding: Encoding, chars: int) -> Encoded | ServingError:
        ids = encoding.ids
        if len(ids) > self.max_input_length:
            return ValidationError(
                f"`inputs` must have less than {self.max_input_length} tokens. Given: {len(ids)}"
            )
        return Encoded(ids, encoding.type_ids, chars)

    def tokens(self, text: str, add_special_tokens: bool, prompt: str | None) -> list[TokenInfo]:
        """The tokens of `text` with character offsets into it (prompt included)."""
        if prompt:
            text = prompt + text
        try:
            encoding = self._plain.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # noqa: BLE001
            raise TokenizerError(f"tokenizer error: {exc}") from exc
        return _token_infos(text, encoding)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        try:
            return self._plain.decode(ids, skip_special_tokens=skip_special_tokens)
        except Exception as exc:  # noqa: BLE001
            raise TokenizerError(f"tokenizer error: {exc}") from exc


def _full_text(item: TextInput) -> str:
    return item.prompt + item.text if item.prompt else item.text


def _token_infos(text: str, encoding: Encoding) -> list[TokenInfo]:
    infos = []
    for token_id, (start, stop), special, token in zip(
        encoding.ids,
        encoding.offsets,
        encoding.special_tokens_mask,
        encoding.tokens,
        strict=True,
    ):
        if special:
            infos.append(TokenInfo(token_id, token, True, None, None))
        else:
            infos.append(TokenInfo(token_id, text[start:stop], False, start, stop))
    return infos


def _load_tokenizer(path: Path) -> Tokenizer:
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            return Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # noqa: BLE001
            raise StartupError(
                f"model at {path} is not loadable: bad tokenizer.json: {exc}"
            ) from exc
    # No tokenizer.json: let transformers build the fast tokenizer from vocab files.
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    except Exception as exc:  # noqa: BLE001
        raise StartupError(f"model at {path} is not loadable: no usable tokenizer: {exc}") from exc


def _copy(tokenizer: Tokenizer) -> Tokenizer:
    # tokenizer.json files often pin padding/truncation for training; TEI ignores both.
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy
