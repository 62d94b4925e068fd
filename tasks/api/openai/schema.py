"""The ``/v1`` request bodies, as OpenAI documents them, and what each becomes as a fleet job.

Unknown fields are accepted and ignored (OpenAI's clients send new ones every release); a field that asks for
something the fleet cannot do (``n`` above 1, tools, log probabilities, a JSON response format, penalties, token-id
input) is refused with a 400 that names it, rather than silently answered without it.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from gpufleet.tasks.api.openai.errors import OpenAIError, invalid
from gpufleet.tasks.contracts import MAX_NEW_TOKENS, MAX_STOP_STRINGS, MAX_TEXT_CHARS, MAX_TEXTS

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 32  # prompts of one /v1/completions request (each is its own job)
# OpenAI's roles, as the fleet's chat contract names them ("developer" is the newer name for "system").
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    model: StrictStr = Field(min_length=1, max_length=256)
    user: StrictStr | None = None


_BodyT = TypeVar("_BodyT", bound=_Body)


def text_list(value: str | list[Any], field: str, *, limit: int) -> list[str]:
    """A string-or-list-of-strings field as a list of texts, each non-empty and within the character limit.

    Raises:
        OpenAIError: 400 naming ``field``: token ids instead of text, an empty list or text, too many or too long.
    """
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise invalid(f"{field} is an empty list; send a string or a list of strings", field)
    if not all(isinstance(text, str) for text in texts):
        raise invalid(f"{field} must be a string or a list of strings; token-id {field} is not supported", field)
    if len(texts) > limit:
        raise invalid(f"{field} has {len(texts)} texts; the limit is {limit} a request", field)
    for index, text in enumerate(texts):
        if not text.strip():
            raise invalid(f"{field}[{index}] is empty: every text must contain something", field)
        if len(text) > MAX_TEXT_CHARS:
            raise invalid(f"{field}[{index}] has {len(text)} characters; the limit is {MAX_TEXT_CHARS}", field)
    return texts


def parse(model: type[_BodyT], raw: Any) -> _BodyT:
    """A request body as ``model``.

    Raises:
        OpenAIError: 400 naming the first field at fault.
    """
    if not isinstance(raw, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise invalid(f"invalid request: {problems}", param=where) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    include_usage: StrictBool = False


class _Sampling(_Body):
    """The options chat and completions share."""

    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    top_logprobs: StrictInt | None = None

    def refuse_unsupported(self) -> None:
        """Raises: OpenAIError: 400 for an option the fleet does not implement."""
        if self.n not in (None, 1):
            raise invalid("n must be 1: the fleet returns one choice per request; send n requests instead", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise invalid(f"{name} is not supported by the fleet; leave it unset or 0", name)
        if self.logit_bias:
            raise invalid("logit_bias is not supported by the fleet; leave it unset", "logit_bias")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise invalid("log probabilities are not supported by the fleet; leave logprobs unset", "logprobs")

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"stop has {len(stops)} strings; the limit is {MAX_STOP_STRINGS}", "stop")
        return stops

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        """The job's generation options."""
        if max_tokens > MAX_NEW_TOKENS:
            raise invalid(
                f"max_tokens is {max_tokens}; the fleet generates at most {MAX_NEW_TOKENS} tokens a request",
                "max_tokens",
            )
        body: dict[str, Any] = {
            "model": self.model,
            "max_new_tokens": max_tokens,
            # OpenAI's default temperature is 1 (sampling); the fleet's 0 is greedy, as OpenAI's 0 is.
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        stops = self.stop_list()
        if stops:
            body["stop"] = stops
        if self.streaming:
            body["stream"] = True
        return body


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise invalid("tools and function calling are not supported by the fleet; leave tools unset", "tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise invalid(
                "response_format other than text is not supported by the fleet (no constrained decoding); "
                "leave it unset",
                "response_format",
            )

    def requested_max_tokens(self, default_max_tokens: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default_max_tokens

    def job_messages(self) -> list[dict[str, str]]:
        """The messages as the fleet's chat contract takes them: role and text.

        Raises:
            OpenAIError: 400 for a tool message, an image or audio part, or a message without text.
        """
        converted: list[dict[str, str]] = []
        for index, message in enumerate(self.messages):
            where = f"messages[{index}]"
            role = message.get("role")
            if role not in ROLES:
                raise invalid(
                    f"{where}.role is {role!r}; the fleet takes system, developer, user and assistant messages "
                    "(no tool messages: tools are not supported)",
                    f"{where}.role",
                )
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for part_index, part in enumerate(content):
                    if (
                        not isinstance(part, dict)
                        or part.get("type") != "text"
                        or not isinstance(part.get("text"), str)
                    ):
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise invalid(
                            f"{where}.content[{part_index}] is of type {kind!r}; the fleet's models take text "
                            "parts only ({'type': 'text', 'text': ...})",
                            f"{where}.content",
                        )
                    texts.append(part["text"])
                content = "\n".join(texts)
            if not isinstance(content, str):
                raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
            if len(content) > MAX_TEXT_CHARS:
                raise invalid(
                    f"{where}.content has {len(content)} characters; the limit is {MAX_TEXT_CHARS}", f"{where}.content"
                )
            converted.append({"role": ROLES[role], "content": content})
        return converted

    def job_body(self, default_max_tokens: int) -> dict[str, Any]:
        """The ``fleet.generate`` request this chat completion becomes."""
        self.refuse_unsupported()
        body = self.sampling(self.requested_max_tokens(default_max_tokens))
        body["messages"] = self.job_messages()
        return body


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (the legacy text completion)."""

    prompt: StrictStr | list[Any]
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str]:
        """The prompts, one job each.

        Raises:
            OpenAIError: 400 for token-id prompts, an empty prompt, or too many.
        """
        self.refuse_unsupported()
        if self.echo:
            raise invalid("echo is not supported by the fleet; leave it unset", "echo")
        if self.best_of not in (None, 1):
            raise invalid("best_of must be 1: the fleet returns one choice per prompt", "best_of")
        if self.suffix:
            raise invalid("suffix (insertion) is not supported by the fleet; leave it unset", "suffix")
        prompts = text_list(self.prompt, "prompt", limit=MAX_PROMPTS)
        if self.streaming and len(prompts) > 1:
            raise invalid("streaming takes one prompt a request; send the prompts as separate requests", "prompt")
        return prompts

    def job_body(self, prompt: str) -> dict[str, Any]:
        """The ``fleet.generate`` request for one of the prompts."""
        body = self.sampling(self.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        body["prompt"] = prompt
        return body


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    input: StrictStr | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None

    def texts(self) -> list[str]:
        """The texts of one ``fleet.embed`` job.

        Raises:
            OpenAIError: 400 for token-id input, an empty text, too many texts or too long a text.
        """
        if self.dimensions is not None:
            raise invalid(
                "dimensions is not supported: the fleet returns the model's own size; leave it unset", "dimensions"
            )
        return text_list(self.input, "input", limit=MAX_TEXTS)


__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "OpenAIError",
    "StreamOptions",
    "parse",
]
