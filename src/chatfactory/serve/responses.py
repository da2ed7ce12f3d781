"""What the endpoints answer, as pydantic models: for the OpenAPI schema only (api.py builds the answers
as dicts itself). The fuzzing bench (bench/fuzz_and_soak.py) checks every answer, SSE chunks included,
against these."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    precision: str = Field(description="the weights: float32, bfloat16, int8, or int4 (groups of G)")
    memory: Literal["resident", "streamed"] = Field(
        description="where the weights live while serving: all in memory (resident), or the layers beyond "
                    "--max-memory read from disk just before they run (streamed)")
    memory_budget_mb: float | None = Field(None, description="streamed: the weights' memory budget, in MB")
    version: int | None = Field(None, description="the run's version (RUN/versions/N); null for a stage")
    role: Literal["serving", "arena"] = Field("serving", description="served to every request without a model, "
                                                                     "or one of the arena's versions")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as the model wrote it (valid under the tool's schema)")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "abort"]
ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None  # in the call's first delta
    arguments: str = Field(description="the next fragment: the fragments joined are the call's arguments")


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None  # in the call's first delta, with type and the function's name
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # in each answer's first chunk
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (``data: {chunk}``)."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]  # empty in the last chunk of stream_options.include_usage
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed text completion."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]


class FeedbackCreated(BaseModel):
    id: int
    object: Literal["feedback"]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    active: int = Field(description="requests holding a batch slot now")
    waiting: int = Field(description="requests queued for a slot")
    slots: int = Field(description="batch slots in all")
    cached_tokens: int = Field(description="KV-cache positions held by all slots (0 when idle: nothing leaked)")
    prefix_cache_mb: float = Field(description="memory the prefix cache holds now (0 when it is off)")
    prefix_hit_tokens: int = Field(description="prompt tokens taken from the prefix cache instead of prefilled, "
                                               "since the served version loaded")


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    model_max_length: int
    vocab_size: int


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
