"""Request bodies: OpenAI's completion and chat shapes, and loracli's classification.

Fields OpenAI defines and loracli does not implement are accepted at their neutral value and
refused otherwise (``n`` > 1, ``logprobs``, penalties, ...), so a client never gets an
answer computed differently from what it asked for. Other unknown fields are ignored, as
OpenAI-compatible servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lora_cli.serve.errors import RequestError, bad_request

MAX_STOPS = 4
MAX_PROMPTS = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)


class ClassifyBody(_Body):
    model_config = ConfigDict(extra="forbid")

    image: str | None = None
    """Base64 bytes of an image file, or a ``data:image/...;base64,`` URL."""
    text: str | None = None
    text_pair: str | None = None
    top_k: int = Field(5, ge=1, le=1000)


class _Sampling(_Body):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0
    frequency_penalty: float = 0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
        return stops

    def unsupported(self) -> list[str]:
        out = []
        if self.n != 1:
            out.append("n (one choice per prompt)")
        if self.presence_penalty or self.frequency_penalty:
            out.append("presence_penalty / frequency_penalty")
        if self.logit_bias:
            out.append("logit_bias")
        return out

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Sampling):
    prompt: str | list[str] = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= MAX_PROMPTS:
            raise ValueError(f"give 1 to {MAX_PROMPTS} prompts")
        return value

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.echo:
            out.append("echo")
        if self.logprobs is not None:
            out.append("logprobs")
        if self.best_of not in (None, 1):
            out.append("best_of")
        if self.suffix:
            out.append("suffix")
        return out


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.logprobs:
            out.append("logprobs")
        return out


def parse(model: type[BaseModel], data: Any) -> Any:
    """``data`` (a decoded JSON body) as ``model``, or a 400 naming every bad field."""
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", "invalid_body")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]["loc"]
        raise bad_request("; ".join(problems[:8]), "invalid_field", str(first[0]) if first else None) from None
    unsupported = body.unsupported() if hasattr(body, "unsupported") else []
    if unsupported:
        raise RequestError(400, f"not supported by loracli serve: {', '.join(unsupported)}; leave "
                                f"{'it' if len(unsupported) == 1 else 'them'} out", "unsupported_parameter",
                           unsupported[0].split(" ")[0])
    return body
