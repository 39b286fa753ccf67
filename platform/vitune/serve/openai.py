"""The OpenAI chat-completions wire format that vitune serves: request model, response bodies, error shape.

Only what the server honours is modelled. Unknown request fields are ignored (clients send many), except
those whose silent dropping would change the answer (`n` other than 1, `logprobs`, `tools`), which are
refused. Parsing is as strict as OpenAI's: no type coercion (`"1"` is not a number, `1` not a boolean), every
number within the range its consumer accepts (a `seed` fits in 64 bits), stop strings bounded. Every client
mistake becomes an `APIError`, rendered as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
The engine's domain errors (`vitune.serve.errors`) become `APIError`s here, and only here (`engine_error`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitune.serve.errors import EngineError, GenerationFailed, QueueFull, ReplicaClosing, RequestRejected

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256  # per stop string: the text stream rescans this much at every token
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's int64 range; torch's generator takes it
MAX_TOKENS_LIMIT = 2**31 - 1  # beyond any context; the engine checks the real budget
_STRICT = ConfigDict(extra="ignore", strict=True)


class APIError(Exception):
    """An error answered in OpenAI's shape; `status` is the HTTP status (4xx for client mistakes)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _default_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


# the engine's errors by kind → HTTP status; the first that matches wins
_ENGINE_STATUS: tuple[tuple[type[EngineError], int], ...] = (
    (RequestRejected, 400), (QueueFull, 429), (ReplicaClosing, 503), (GenerationFailed, 500))
# the engine names `ChatRequest` fields; the client sent them as these request fields
_WIRE_PARAM = {"turns": "messages", "system": "messages", "images": "messages"}


def engine_error(err: EngineError) -> APIError:
    """The engine's domain error as the API answers it: its status, and its param as the client's field."""
    status = next((code for kind, code in _ENGINE_STATUS if isinstance(err, kind)), 500)
    return APIError(status, err.message, _WIRE_PARAM.get(err.param or "", err.param), err.code)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"] = "text"
    text: str


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str
    # low = the image's base view alone (an anyres model's one downscaled tile); auto/high/None = the model's own
    # mode (vitune.vision_recipe.visual_tokens counts both)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


ContentPart = TextPart | ImagePart


def _parse_part(index: int, part: Any) -> ContentPart:
    if not isinstance(part, dict):
        raise ValueError(f"content part {index} must be an object with a 'type', got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {index} (text) needs a string 'text'")
        return TextPart(text=part["text"])
    if kind == "image_url":
        image_url = part.get("image_url")
        if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
            raise ValueError(f"content part {index} (image_url) needs 'image_url': {{'url': '...'}}")
        detail = image_url.get("detail")
        if detail is not None and detail not in ("auto", "low", "high"):
            raise ValueError(f"content part {index} (image_url) has detail {_short(detail)}; expected 'auto', "
                             "'low' or 'high'")
        return ImagePart(image_url=ImageURL(url=image_url["url"], detail=detail))
    raise ValueError(f"content part {index} has unsupported type {kind!r}; supported types: text, image_url")


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            return [_parse_part(i, part) for i, part in enumerate(value)]
        raise ValueError(f"content must be a string or a list of content parts, got {type(value).__name__}")

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        # as OpenAI: only an assistant message may leave its content out or null (it then carries tool calls)
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of content parts), "
                             "not null")
        return self

    def text_parts(self) -> list[str]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [self.content]
        return [p.text for p in self.content if isinstance(p, TextPart)]

    def image_parts(self) -> list[ImagePart]:
        if not isinstance(self.content, list):
            return []
        return [p for p in self.content if isinstance(p, ImagePart)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` body. `temperature` defaults to 1 as in OpenAI's API."""

    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())

    model: str | None = None  # None = the one served model
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's newer name; wins
    temperature: float | None = Field(1.0, ge=0, le=2)  # null = the default, as OpenAI takes it
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters long")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported by this model")
        return value

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p) with OpenAI's defaults for null."""
        return (1.0 if self.temperature is None else self.temperature, 1.0 if self.top_p is None else self.top_p)

    @property
    def text_chars(self) -> int:
        """All message text of the request together (what `max_text_chars` bounds)."""
        return sum(len(t) for m in self.messages for t in m.text_parts())

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validation_error(exc: ValidationError) -> APIError:
    """A pydantic `ValidationError` of a request body as a 400 naming the first bad field."""
    errors = exc.errors()
    lines = []
    for err in errors[:5]:
        msg = err["msg"].removeprefix("Value error, ")
        where = _loc(err["loc"])
        shown = "" if err["type"] in ("missing", "value_error") else f" (got {_short(err.get('input'))})"
        lines.append(f"{where}: {msg}{shown}" if where else f"{msg}{shown}")
    if len(errors) > 5:
        lines.append(f"... and {len(errors) - 5} more")
    param = (_loc(errors[0]["loc"]) or None) if errors else None
    return APIError(400, "; ".join(lines) or "invalid request", param=param, code="invalid_value")


def parse_json(raw: bytes) -> Any:
    """JSON as OpenAI takes it: NaN/Infinity, invalid UTF-8, absurd nesting or numbers are a 400."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                       f"{exc.colno}", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, NaN, an int of 5,000 digits, deep nesting
        reason = str(exc) if isinstance(exc, ValueError) and "JSON" in str(exc) else type(exc).__name__
        raise APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json") from None


def parse_request(payload: Any) -> ChatCompletionRequest:
    """A decoded JSON body → request model, or `APIError` 400."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A non-streamed `chat.completion` object."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta=None` gives the final usage-only chunk (empty `choices`)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    """`GET /v1/models`: the one served model."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "vitune"}]}
