"""The OpenAI API's request bodies as bigmodel accepts them, its error JSON, and text decoded token by token
with stop strings (what a streamed answer may show so far)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from bigmodel_cli.tasks.chat import ROLES

MAX_BODY_BYTES = 1 << 20  # a request body over this is refused with 413 before it is parsed
MAX_STOP_STRINGS = 4  # as the OpenAI API allows

Text = Annotated[str, StringConstraints(max_length=MAX_BODY_BYTES)]


class ApiError(Exception):
    """A request the server refuses: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    """Fields common to both endpoints. Strict: "0.5" is not a number, 1.0 is not an integer."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported")
    logprobs: Any = Field(None, description="not supported")
    # Fields that change the answer and that bigmodel cannot honour: refused, since ignoring them would hand back
    # an answer the client did not ask for. Fields that only describe the request (user, metadata) are ignored.
    logit_bias: dict[str, Any] | None = Field(None, description="not supported")
    response_format: dict[str, Any] | None = Field(None, description="text only")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}", "stop")
        return tuple(s for s in stops if s)

    def check_unsupported(self) -> None:
        if self.logprobs not in (None, False):
            raise ApiError(400, "logprobs: bigmodel serve does not return log probabilities", "logprobs")
        if self.logit_bias:
            raise ApiError(400, "logit_bias: bigmodel serve does not bias token probabilities", "logit_bias")
        if (self.response_format or {}).get("type", "text") != "text":
            raise ApiError(400, "response_format: bigmodel serve answers in plain text only", "response_format")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] = Field(description="one prompt: text or token ids")
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI API's default for completions
    echo: bool = Field(False, description="not supported")
    best_of: int = Field(1, ge=1, le=1, description="one candidate per request")
    suffix: Text | None = Field(None, description="not supported")

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ApiError(400, "echo: bigmodel serve does not echo the prompt; prepend it yourself", "echo")
        if self.suffix:
            raise ApiError(400, "suffix: bigmodel serve does not insert text before a suffix", "suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: Text | list[TextPart] | None = None

    def as_dict(self, index: int) -> dict:
        if self.role not in ROLES:
            raise ApiError(
                400, f"messages[{index}].role: unknown role {self.role!r}; use one of {', '.join(ROLES)}", "messages"
            )
        if self.content is None:  # the OpenAI API, too, requires it (null only beside tool calls)
            raise ApiError(400, f"messages[{index}].content: required field missing", "messages")
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: Any = Field(None, description="not supported")
    functions: Any = Field(None, description="not supported (the older name of tools)")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="not supported")

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            raise ApiError(400, f"{name}: bigmodel serve does not call tools", name)


def validation_error(errors: list[dict]) -> ApiError:
    """The first pydantic error as one readable line: 'temperature: Input should be ...'."""
    first = errors[0]
    # loc mixes field names and list indices with the names of the union members tried ("constrained-str",
    # "list[int]"): only the former say where in the request the error is.
    where = ".".join(str(part) for part in first["loc"] if isinstance(part, int) or part in _FIELD_NAMES)
    if first["type"] == "missing":
        return ApiError(400, f"{where}: required field missing", where or None)
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first['msg']})")
    if first["type"] in ("model_type", "model_attributes_type") and not where:
        return ApiError(400, "the request body must be a JSON object")
    return ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], where or None)


_FIELD_NAMES = frozenset(
    name for model in (CompletionRequest, ChatRequest, Message, TextPart) for name in model.model_fields
)


class TextStream:
    """The text of a growing answer, told a token at a time: what may be shown so far, and where it stops.

    Text is held back while it ends in half a UTF-8 character or in what could be the start of a stop string,
    so a streamed answer never shows text that the finished answer does not have."""

    def __init__(self, tokenizer, stop_ids: frozenset[int], stops: tuple[str, ...]):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, stop_ids, stops
        self.ids: list[int] = []
        self.text = ""  # the answer's text so far (cut at a stop string once one shows)
        self.shown = 0  # characters of text already handed out
        self.stopped = False  # a stop string was found: the answer is complete

    def add(self, token: int) -> str:
        """Take a new token; returns the text that may now be shown (possibly empty)."""
        if token not in self.stop_ids:
            self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cuts = [self.text.find(s) for s in self.stops if s in self.text]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # half a character: its other bytes are still to come
            safe -= 1
        hold = 0  # the longest tail that could begin a stop string
        for stop in self.stops:
            for size in range(min(len(stop) - 1, safe), hold, -1):
                if self.text[safe - size : safe] == stop[:size]:
                    hold = size
                    break
        return self._take(safe - hold)

    def flush(self) -> str:
        """Everything not yet shown: the answer has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.shown:
            return ""
        piece, self.shown = self.text[self.shown : end], end
        return piece
