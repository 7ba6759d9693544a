"""The OpenAI-compatible HTTP API's request and response bodies (pydantic models; they also make /openapi.json).

Requests accept the fields OpenAI's clients send. Fields that would change the output in a way this
server cannot honour (logprobs, echo, suffix, logit_bias, penalties, tools, ...) are refused with 400
when set to anything but their default, instead of being silently ignored; unknown fields are ignored.
`top_k` is accepted as an extension (as vLLM does).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CHOICES = 16  # n: sessions run for one request

# field -> the values that mean "not used" (anything else is refused)
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
}

Prompt = Union[str, list[str], list[int], list[list[int]]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="a model name (its 'latest' version) or 'name:version' / 'name:alias'")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, defaults in _UNSUPPORTED.items():
                value = data.get(name)
                if not any(value == d and type(value) is type(d) for d in defaults):
                    raise ValueError(f"`{name}` is not supported by this server; leave it unset")
            best_of, n = data.get("best_of"), data.get("n", 1)
            if best_of is not None and best_of != n:
                raise ValueError("`best_of` is not supported by this server; leave it unset (or equal to n)")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a last chunk with the usage of the whole request")


class GenerationRequest(_Request):
    max_tokens: int | None = Field(
        None, ge=1, description="new tokens at most (default: the gateway's --default-max-tokens)"
    )
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default 1 (off)")
    top_k: int | None = Field(
        None, ge=0, lt=2**31, description="extension: sample among the k likeliest tokens (0 = off)"
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices to generate; each runs its own session")
    seed: int | None = Field(
        None, description="makes sampling reproducible; choice i uses seed + i (taken modulo 2**64)"
    )
    stop: str | list[str] | None = Field(None, description="up to 4 sequences that end the output")
    stream: bool = Field(False, description="send server-sent events, ending with `data: [DONE]`")
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(GenerationRequest):
    prompt: Prompt = Field(
        description="a string, an array of strings, an array of token ids, or an array of such arrays; "
        "each prompt gets n choices"
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens (newer clients)")


class EmbeddingRequest(_Request):
    input: Prompt = Field(description="a string or an array of strings (token-id input is not supported)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the little-endian float32 bytes of each vector"
    )
    dimensions: int | None = Field(None, ge=1, description="must equal the model's hidden size if given")
    user: str | None = None


# ---- responses ------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelgrid"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _Generated(BaseModel):
    id: str
    created: int
    model: str  # as the request named it
    system_fingerprint: str = Field(description="the model and version that served the request ('name:v2')")
    usage: Usage


class _Choice(BaseModel):
    index: int  # prompt index x n + choice index
    logprobs: None = None
    finish_reason: str | None  # "stop" | "length"


class CompletionChoice(_Choice):
    text: str


class Completion(_Generated):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletion(_Generated):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage
