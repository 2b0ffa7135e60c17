"""The OpenAI request bodies of /v1/chat/completions and /v1/completions (and herd's /v1/weights) as pydantic
models: the one place where a body's shape and every value's bounds are checked, and what /openapi.json shows.

Shapes follow OpenAI's API reference (platform.openai.com/docs/api-reference/chat/create and .../completions/create)
plus vLLM's sampling extras (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, as in vLLM's
protocol.py) and its `return_tokens_as_token_ids` (logprobs name each token "token_id:<id>", so a trainer gets the
sampled ids themselves, not text it would have to re-tokenize). Design:
- Strict types (pydantic's strict mode): `stream: "no"` is an error, not a truthy string; `5` is not a string;
  `true` is not an int. Floats must be finite. Ints carry real bounds (token ids fit int32, a seed int64, top_k at
  most 2^31 - 1), so no value can overflow later inside the engine, where it would fail other requests' rows.
- Unknown fields are ignored, as herd always did and as vLLM does (OpenAI itself refuses them): clients send
  vendor extras such as `user` or `parallel_tool_calls` that change nothing here.
- Only shape, bounds and combinations of fields (max_tokens 0 needs `echo`) live here. What herd does not do
  (constrained decoding, `suffix`, `best_of`) and what needs the server's state (the model's context, vocabulary,
  media folder, the tools a tool_choice names) is refused by herd.serve.service, with messages that say so.
- `parse` reads JSON with pydantic's own parser: nesting deeper than its limit (about 200 levels) is an error,
  not a RecursionError, and NaN / Infinity literals are refused. `message` turns a ValidationError into one sentence
  that names the field as the client wrote it (`messages[0].content[1].text`), with a hint where a union (content,
  stop, tool_choice) failed as a whole.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from herd.chat import ROLES

INT32_MAX = 2**31 - 1  # token ids and top_k: torch's long columns take far more, but no vocabulary is near this
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: what torch.Generator.manual_seed takes (seed + n stays in range)
MAX_N = 8
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_STOP = 4  # OpenAI's limit on `stop`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on `top_logprobs`; vLLM allows 20 for the completions API's `logprobs` too

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Unit = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


# ---- chat messages ---------------------------------------------------------------------------------------------------
class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(description="a data: URL, or a path inside the server's --media-dir")
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _no_nul(cls, url: str) -> str:
        if "\0" in url:
            raise ValueError("an image URL cannot contain a NUL character")
        return url


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str  # OpenAI sends the object; a bare string is herd.chat's shorthand


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] | None = None  # OpenAI: a JSON string; herd.chat also takes the object


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal[tuple(ROLES)]  # type: ignore[valid-type]  # OpenAI's roles and Llama's "ipython"
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


# ---- tools -----------------------------------------------------------------------------------------------------------
class Function(_Body):
    # Extra keys are kept: a tool is shown to the model as the JSON the client sent.
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: Function


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Body):
    include_usage: bool | None = None


class ResponseFormat(_Body):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


# ---- the two request bodies ------------------------------------------------------------------------------------------
class _Request(_Body):
    """What both endpoints take: the model, how much to generate, sampling, stops, streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)  # OpenAI's newer name for max_tokens
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="vLLM's: 0 or -1 = off")
    min_p: Unit | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="vLLM's: 1 = off")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's: logprobs name tokens \"token_id:<id>\"")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias):
        bad = next((k for k in bias or {} if not (k.isascii() and k.isdigit() and int(k) <= INT32_MAX)), None)
        if bad is not None:
            raise ValueError(f"logit_bias keys must be token ids written as strings (\"1234\"), got {bad!r}")
        return bias

    @property
    def limit(self) -> int | None:
        """max_completion_tokens or max_tokens (None: up to the end of the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top, info):
        if top and not info.data.get("logprobs"):  # OpenAI: "logprobs must be set to true if this is used"
            raise ValueError("top_logprobs needs \"logprobs\": true")
        return top


class CompletionRequest(_Request):
    # max_tokens 0 is the completions API's scoring request: `echo` with `logprobs` and nothing generated (OpenAI's
    # legacy API takes it; lm-eval's loglikelihood requests send it or 1 and drop the generated token)
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token; with `echo`, "
                                 "the prompt's tokens get them too (the first one null)")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _zero_needs_echo(self):
        if self.limit == 0 and not self.echo:
            field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise ValidationError.from_exception_data("CompletionRequest", [{
                "type": "value_error", "loc": (field,), "input": 0, "ctx": {"error": ValueError(
                    f"{field} 0 generates nothing: it needs \"echo\": true (with \"logprobs\" for the prompt's "
                    "logprobs), or a value >= 1")}}])
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, p):
        def ids(x) -> bool:
            return isinstance(x, list) and len(x) > 0 and all(type(t) is int and 0 <= t <= INT32_MAX for t in x)

        one = isinstance(p, str) or ids(p)
        if not (one or (isinstance(p, list) and 0 < len(p) <= MAX_PROMPTS and
                        (all(isinstance(x, str) for x in p) or all(ids(x) for x in p)))):
            raise ValueError(f"prompt must be a string, a list of token ids (ints >= 0), or a list of at most "
                             f"{MAX_PROMPTS} of either")
        return p

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt a string or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class WeightsRequest(_Body):
    """POST /v1/weights: load the weights in `path` (a folder inside the server's --weights-dir) as `version`."""

    path: str = Field(min_length=1, description="a subfolder of the server's --weights-dir, relative to it")
    version: int = Field(ge=0, le=INT64_MAX, description="the trainer's policy version, reported back")

    @field_validator("path")
    @classmethod
    def _no_nul(cls, path: str) -> str:
        if "\0" in path:
            raise ValueError("a path cannot contain a NUL character")
        return path


class ModerationRequest(_Body):
    """POST /v1/moderations (OpenAI's shape, text inputs): each input is classified by the server's guard."""

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    model: str | None = None


RequestBody = ChatCompletionRequest | CompletionRequest


# ---- JSON in, request or one-sentence error out ----------------------------------------------------------------------
HINTS = {  # what a field takes, for a value that matches none of its union's shapes
    "content": "a string, null, or a list of parts ({\"type\": \"text\", \"text\": ...} or "
               "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}})",
    "stop": f"a non-empty string or a list of at most {MAX_STOP} of them",
    "tool_choice": "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
    "image_url": "{\"url\": ...}",
    "arguments": "a JSON string",
}


def parse(raw: bytes) -> Any:
    """JSON text -> Python values (ValueError: not JSON, NaN / Infinity, or nested too deeply)."""
    return pydantic_core.from_json(raw, allow_inf_nan=False)


def _path(body: Any, loc: tuple, missing: bool) -> tuple[str, Any]:
    """The client's name for an error's location (pydantic's loc also holds union branch tags: they are skipped by
    following the loc through the body itself), and the value there."""
    out, cur = "", body
    for i, step in enumerate(loc):
        if isinstance(cur, dict) and isinstance(step, str) and step in cur:
            out, cur = f"{out}.{step}" if out else step, cur[step]
        elif isinstance(cur, list) and isinstance(step, int) and 0 <= step < len(cur):
            out, cur = f"{out}[{step}]", cur[step]
        elif missing and i == len(loc) - 1:
            out += f".{step}" if out else str(step)
    return out, cur


def message(e: ValidationError, body: Any) -> tuple[str, str | None]:
    """(one sentence, param) for the most specific problem in `e`."""
    found = []
    for err in e.errors(include_url=False):
        path, value = _path(body, err["loc"], err["type"] == "missing")
        found.append((path.count(".") + path.count("["), path, value, err))
    depth = max(f[0] for f in found)
    here = [f for f in found if f[0] == depth]
    _, path, value, err = here[0]
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    field = path.rsplit(".", 1)[-1].split("[")[0]
    kind, msg = err["type"], err["msg"].replace("Input should be", "must be")
    if kind == "missing":
        text = f"{path} is required"
    elif len(here) > 1 and len({f[1] for f in here}) == 1:  # every branch of a union failed at the same place
        text = f"{path} must be {HINTS.get(field, ' or '.join(f[3]['msg'] for f in here))}, got {shown}"
    elif kind == "union_tag_invalid":
        text = f"{path}.type must be one of {err['ctx']['expected_tags']}, got {err['ctx']['tag']!r}"
    elif kind == "value_error":
        msg = str(err["ctx"]["error"])
        text = path[:len(path) - len(field)] + msg if msg.startswith(field + " ") else f"{path}: {msg}"
    else:
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            msg = "must be a JSON object"
        text = f"{path} {msg}, got {shown}" if msg.startswith("must") else f"{path}: {msg}, got {shown}"
    return text.lstrip(": "), path or None
