"""OpenAI's wire format as this server speaks it: request and response bodies, the error shape, text out.

What a request may hold (``Limits``; one pydantic model per request body, from which the OpenAPI schema
is generated too) and how a bad one is refused (``APIError`` → OpenAI's error JSON with a 4xx naming the
field). How sampled ids become the text a client sees is detokenize.py's. No HTTP and no model here:
``api.py`` wires these to FastAPI and the scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_messages: int = 256
    max_message_chars: int = 32_000
    max_n: int = 8
    max_stop: int = 4
    max_prompts: int = 64  # prompts in one /v1/completions call
    max_logprobs: int = 20


LIMITS = Limits()  # what the request models below check: the OpenAPI schema shows the same numbers


class APIError(Exception):
    """Becomes OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # a 429's Retry-After (seconds)

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request bodies
# One pydantic model per request body. The server validates each body with its model (after reading
# the bytes itself, so that the size limit holds while a body streams in: guard.read_body), and the
# OpenAPI schema at /openapi.json is generated from the same models, so the two cannot drift apart.
# JSON types are strict, as OpenAI's are: a boolean is never a number and "5" is not an integer (an
# integer is a number). null means "not given" for every optional field. Unions are told apart by the
# JSON value's shape (a callable discriminator), so an error names the field, not a union member.
# Nothing is dropped silently on the completion endpoints: an unknown key is a 400 naming it (as OpenAI
# answers one), and an OpenAI parameter this server does not implement is accepted at its default value
# only (``only_default``: clients send some by habit), any other value a 400 naming it.

def _integral(v):
    """JSON has numbers, not integers: 5.0 is the integer 5 (as JSON Schema counts it); 5.5 and true are not."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(**constraints):
    """A JSON integer with these constraints (ge=, le=, ...). They apply to the integer itself, before the
    5.0 -> 5 conversion wraps it, so that the schema shows them as JSON Schema's minimum and maximum."""
    return Annotated[int, Strict(), Field(**constraints), BeforeValidator(_integral)]


SInt = Int()
SFloat = Annotated[float, Strict()]  # an integer is a number too; a boolean or a string is not
SBool = Annotated[bool, Strict()]
SStr = Annotated[str, Strict()]
TokenId = Int(ge=0, description="a token id: below the tokenizer's vocab_size (GET /tokenizer_info)")
Text = Annotated[str, Strict(), Field(max_length=LIMITS.max_message_chars)]
FLOAT32_TINY = 2.0 ** -126  # float32's smallest normal number (torch.finfo(torch.float32).tiny)
CHAT_ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system


def int_choice(*values: int):
    """An integer that must be one of ``values`` (a pydantic Literal would take true for 1)."""
    def check(v):
        if v not in values:
            raise PydanticCustomError("invalid_value", "must be one of {values}",
                                      {"values": ", ".join(map(str, values))})
        return v
    return Annotated[SInt, AfterValidator(check), WithJsonSchema({"type": "integer", "enum": list(values)})]


def by_shape(shape, what: str):
    """A union's discriminator: ``shape(value)`` names the member (None: no member fits -> invalid_type)."""
    return Discriminator(shape, custom_error_type="invalid_type", custom_error_message=f"must be {what}")


def _list_of(v, kind) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], kind) and not isinstance(v[0], bool)


class Body(BaseModel):
    """What every request body may hold: the model it is meant for (this server's only, when given)."""
    model_config = ConfigDict(extra="ignore")
    model: SStr | None = Field(None, description="the served model's id (GET /v1/models); null or absent: that one")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


Content = Annotated[
    Annotated[Text, Tag("as text")] | Annotated[list[TextPart], Tag("as parts")],
    by_shape(lambda v: "as text" if isinstance(v, str) else "as parts" if isinstance(v, list) else None,
             "a string or a list of text parts")]


class CalledFunction(BaseModel):
    name: Annotated[str, Strict(), Field(min_length=1, max_length=64)]
    arguments: Annotated[str, Strict(), Field(max_length=LIMITS.max_message_chars)] = Field(
        description="the arguments as a JSON object, in a string (as the model wrote them)")


class ToolCall(BaseModel):
    id: Annotated[str, Strict(), Field(min_length=1, max_length=64)]
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    role: Literal[CHAT_ROLES + ("tool",)]
    content: Content | None = Field(description="null only for an assistant message with tool_calls")
    name: Annotated[str, Strict(), Field(max_length=64)] | None = Field(None, description="accepted, not used")
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=16)] | None = Field(
        None, description="an assistant message's calls (its content may be null then)")
    tool_call_id: Annotated[str, Strict(), Field(min_length=1, max_length=64)] | None = Field(
        None, description="a tool message: the call it answers")

    @field_validator("content")
    @classmethod
    def _length(cls, c):
        if isinstance(c, list) and sum(len(p.text) for p in c) > LIMITS.max_message_chars:
            raise PydanticCustomError("string_too_long", "its text parts hold more than {limit} characters",
                                      {"limit": LIMITS.max_message_chars})
        return c

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("missing", "content: only an assistant message with tool_calls may have "
                                                 "no content")
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("invalid_value", "tool_calls: only an assistant message makes calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise PydanticCustomError("invalid_value", "tool_call_id: a tool message, and only a tool message, "
                                                       "names the call it answers")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class LaterChatMessage(ChatMessage):
    """A message after the first one: any role but system (for the schema: JSON Schema's prefixItems)."""
    role: Literal["user", "assistant", "tool"]


def _system_first(msgs):
    for i, m in enumerate(msgs):
        if i and m.role in ("system", "developer"):
            raise PydanticCustomError("invalid_value", "a system message may only come first (messages[{i}] is one)",
                                      {"i": i})
    return msgs


Conversation = Annotated[list[ChatMessage], Field(min_length=1, max_length=LIMITS.max_messages),
                         AfterValidator(_system_first)]

Stop = Annotated[
    Annotated[SStr, Tag("as text")] | Annotated[list[SStr], Field(max_length=LIMITS.max_stop), Tag("as list")],
    by_shape(lambda v: "as text" if isinstance(v, str) else "as list" if isinstance(v, list) else None,
             "a string or a list of strings")]


def only_default(kind, *defaults, what: str = ""):
    """An OpenAI parameter this server does not implement: accepted at ``defaults`` (null too), else a 400."""
    def check(v):
        if v not in defaults:
            raise PydanticCustomError("unsupported_parameter", "this server does not support it{what}; only its "
                                      "default ({defaults}) is accepted",
                                      {"what": what, "defaults": " or ".join(json_text(d) for d in defaults)})
        return v
    return Annotated[kind, AfterValidator(check),
                     Field(description=f"not supported{what}: only {' or '.join(json_text(d) for d in defaults)}")]


def json_text(v) -> str:
    import json

    return json.dumps(v)


Metadata = Annotated[dict[str, Annotated[str, Strict(), Field(max_length=512)]], Field(max_length=16)]


class SamplingBody(Body):
    """The sampling settings both completion endpoints share. Any temperature in (0, 2] is valid, tiny
    ones too (OpenAI accepts them; the sampler shifts logits by their maximum, so they sample greedily)."""
    model_config = ConfigDict(extra="forbid")
    temperature: SFloat | None = Field(None, ge=0, le=2, description="default 1; 0 is greedy")
    top_p: SFloat | None = Field(None, gt=0, le=1, description="default 1 (off)")
    top_k: Int(ge=-1) | None = Field(None, description="default 0 (off); -1 is off too")
    repetition_penalty: SFloat | None = Field(None, gt=0, le=10, description="default 1 (off)")
    # int64, as OpenAI documents it; sibling answers of n > 1 take seed + j, still in torch's range
    seed: Int(ge=-2 ** 63, lt=2 ** 63) | None = None
    n: Int(ge=1, le=LIMITS.max_n) | None = Field(None, description="answers per prompt, default 1")
    stream: SBool | None = Field(None, description="server-sent events (text/event-stream) ending in 'data: [DONE]'")
    stop: Stop | None = None
    # vLLM's and llama.cpp's extension: generate past the end-of-turn token, to max_tokens (benchmarks)
    ignore_eos: SBool | None = Field(None, description="default false; true: only max_tokens or stop ends it")
    # what clients send by habit, with no effect on the answer
    user: SStr | None = Field(None, description="who asks (OpenAI's end-user id): accepted, not used")
    metadata: Metadata | None = Field(None, description="accepted, not stored")
    # OpenAI's and vLLM's parameters this server does not implement: their defaults only
    frequency_penalty: only_default(SFloat, 0) | None = None
    presence_penalty: only_default(SFloat, 0) | None = None
    logit_bias: only_default(dict[str, SFloat], {}) | None = None
    service_tier: only_default(SStr, "auto", "default") | None = None
    store: only_default(SBool, False, what=" (nothing is stored)") | None = None
    min_p: only_default(SFloat, 0) | None = None
    min_tokens: only_default(SInt, 0) | None = None

    def sampling(self) -> dict:
        """-> the settings with defaults filled in (what api.py hands the scheduler)."""
        stops = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        temperature = float(_given(self.temperature, 1.0))
        if temperature < FLOAT32_TINY:
            # the sampler divides float32 logits by the temperature: below float32's smallest normal
            # number it rounds to 0 (1e-117 -> 0/0 = NaN, and an id past the vocabulary came out). Such a
            # temperature samples greedily anyway (its limit), so it is greedy here
            temperature = 0.0
        return dict(temperature=temperature, top_p=float(_given(self.top_p, 1.0)),
                    top_k=max(0, self.top_k or 0), repetition_penalty=float(_given(self.repetition_penalty, 1.0)),
                    seed=self.seed, n=self.n or 1, stream=bool(self.stream), stop=[s for s in stops if s],
                    ignore_eos=bool(self.ignore_eos))

    def asked_tokens(self) -> tuple[str, int | None]:
        """(the field that sets the completion length, its value): ``max_completion_tokens`` wins."""
        key = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return key, getattr(self, key)

    def max_tokens_for(self, prompt_len: int, block: int, default: int | None) -> int:
        """The completion length asked for (``asked_tokens``), checked against the context."""
        key, asked = self.asked_tokens()
        if prompt_len >= block:
            raise APIError(400, f"This model's maximum context length is {block} tokens; the prompt has {prompt_len}.",
                           "messages" if hasattr(self, "messages") else "prompt", "context_length_exceeded")
        room = block - prompt_len
        if asked is None:
            return min(default, room) if default is not None else room
        if asked > room:
            raise APIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                           f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).",
                           key, "context_length_exceeded")
        return asked


def _given(v, default):
    return default if v is None else v


class StreamOptions(BaseModel):
    include_usage: SBool | None = Field(None, description="a last chunk with the usage and no choices")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Strict(), Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: SStr | None = None
    schema_: dict | None = Field(None, alias="schema", description="a JSON Schema (default: any JSON object)")
    strict: SBool | None = Field(None, description="accepted either way: the reply is always constrained")


class TextFormat(BaseModel):
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    type: Literal["json_object"]


class JSONSchemaResponse(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponse, Field(discriminator="type")]


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Strict(), Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Annotated[str, Strict(), Field(max_length=4096)] | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of the arguments object")
    strict: SBool | None = Field(None, description="accepted either way: the arguments are always constrained")


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: SStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("as text")] | Annotated[NamedToolChoice, Tag("as object")],
    by_shape(lambda v: "as text" if isinstance(v, str) else "as object" if isinstance(v, dict) else None,
             "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")]


class ChatCompletionRequest(SamplingBody):
    messages: Conversation
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the reply is decoded under that grammar (valid JSON always)")
    tools: Annotated[list[Tool], Field(max_length=64)] | None = Field(None, description="functions the model may call")
    tool_choice: ToolChoice | None = Field(None, description="default 'auto' with tools, 'none' without")
    parallel_tool_calls: SBool | None = Field(None, description="default true: more than one call in a reply")
    max_tokens: Int(ge=1) | None = Field(None, description="default: the room left in the context")
    max_completion_tokens: Int(ge=1) | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: SBool | None = None
    top_logprobs: Int(ge=0, le=LIMITS.max_logprobs) | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extension: more variables for the model's chat template (Qwen3's {"enable_thinking": false})
    chat_template_kwargs: dict[str, SBool | SInt | SFloat | SStr | None] | None = Field(
        None, description="variables the chat template reads, e.g. {\"enable_thinking\": false} for Qwen3")


def _prompt_shape(v):
    if isinstance(v, str):
        return "as text"
    for kind, tag in ((str, "as texts"), ((int, float), "as ids"), (list, "as id lists")):
        if _list_of(v, kind):
            return tag
    return None


Prompt = Annotated[
    Annotated[Text, Tag("as text")]
    | Annotated[list[Text], Field(min_length=1, max_length=LIMITS.max_prompts), Tag("as texts")]
    | Annotated[list[TokenId], Field(min_length=1), Tag("as ids")]
    | Annotated[list[list[TokenId]], Field(min_length=1, max_length=LIMITS.max_prompts), Tag("as id lists")],
    by_shape(_prompt_shape, "a string, a list of strings, a list of token ids or a list of such lists")]


class CompletionRequest(SamplingBody):
    prompt: Prompt
    max_tokens: Int(ge=0) | None = Field(None, description="default 16; 0 with echo and logprobs scores the prompt")
    max_completion_tokens: Int(ge=0) | None = None
    echo: SBool | None = Field(None, description="the prompt comes back before the completion (not with stream)")
    logprobs: Int(ge=0, le=LIMITS.max_logprobs) | None = Field(
        None, description="log-probs of each token and this many alternatives (not with stream)")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string, or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class TokenizeText(Body):
    prompt: Annotated[str, Strict(), Field(max_length=LIMITS.max_body_bytes)]
    add_special_tokens: SBool | None = Field(
        None, description="default true: open with <|bos|> where the model's documents do")
    messages: None = None  # a body with messages is the other kind


class TokenizeChat(Body):
    messages: Conversation
    add_generation_prompt: SBool | None = Field(None, description="default true: end with the assistant's turn opening")


class DetokenizeRequest(Body):
    tokens: list[TokenId]


# a body that is one of two kinds, told apart by a key as api.py reads it
TokenizeRequest = TokenizeChat | TokenizeText


def parse_body(model, body: dict):
    """``body`` (a JSON object) as ``model`` -> the model instance, or APIError 400 naming the field. A key the
    model does not know is refused unless its value is null: null means "not given" (SDKs send some so)."""
    if model.model_config.get("extra") == "forbid" and isinstance(body, dict):
        known = {f.alias or k for k, f in model.model_fields.items()}
        body = {k: v for k, v in body.items() if v is not None or k in known}
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def parse_tokenize(body: dict) -> TokenizeChat | TokenizeText:
    return parse_body(TokenizeChat if body.get("messages") is not None else TokenizeText, body)


def _param(loc) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif " " not in part:  # "as text" and the like name a union member, not a key
            out += ("." if out else "") + part
    return out or None


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint -> OpenAI's error: the field as ``param``, a code clients can test."""
    err = e.errors(include_url=False)[0]
    kind, param = err["type"], _param(err["loc"])
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "too_long" and param == "messages":
        code = "too_many_messages"
    elif kind == "unsupported_parameter":
        code = kind
    elif kind == "string_too_long":
        code = "message_too_long"
    elif kind in ("missing", "invalid_type", "invalid_value"):
        code = kind
    elif kind.endswith("_type"):
        code = "invalid_type"
    else:
        code = "invalid_value"
    msg = f"{param}: {err['msg']}" if param else err["msg"]
    got = err.get("input")
    if kind != "missing" and (got is None or isinstance(got, (bool, int, float, str))):
        shown = repr(got)
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return APIError(400, msg, param, code)
