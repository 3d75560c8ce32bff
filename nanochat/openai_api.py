"""
The OpenAI-compatible request and response shapes the server speaks (nanochat.web_server), as plain data.

Requests are validated with pydantic models that ignore unknown fields (clients send many we do not use); every
problem becomes an APIError in OpenAI's shape {"error": {"message", "type", "param", "code"}} with the status a
client expects: 400 invalid request (never FastAPI's 422, and never a 500: the official client retries 5xx),
401 wrong key, 404 unknown model, 413 body too large, 429 queue full.

Chat messages: roles system | developer (treated as system) | user | assistant; content a string or a list of
{"type": "text", "text": ...} parts; consecutive messages of one role are joined (nanochat's template alternates
user/assistant), and the last message must be the user's.
"""

import json
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 1_000_000
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 32_000
MAX_TOTAL_CHARS = 100_000
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                             500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatMessage(_Lenient):
    role: str
    content: Union[str, list, None] = None


class SamplingFields(_Lenient):
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def stop_strings(self):
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return [s for s in stops if s]

    def requested_max_tokens(self, default):
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return default if value is None else value


class ChatOptions(_Lenient):
    """Ours beyond OpenAI's fields: think "on"/"off" (null: the model's default; vLLM's
    chat_template_kwargs.enable_thinking is read too) and search "off"/"auto"/"force" (the server calls
    web_search itself where the answer begins when the question needs it; needs a search provider)."""
    think: Optional[Literal["on", "off"]] = None
    search: Literal["off", "auto", "force"] = "off"
    chat_template_kwargs: Optional[dict] = None

    def think_mode(self):
        if self.think is None and isinstance(self.chat_template_kwargs, dict):
            enabled = self.chat_template_kwargs.get("enable_thinking")
            if isinstance(enabled, bool):
                return "on" if enabled else "off"
        return self.think


class ChatRequest(SamplingFields, ChatOptions):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class NanochatChatRequest(ChatOptions):
    """nanochat's own /chat/completions body (plus our think/search)."""
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_k: Optional[int] = Field(None, ge=0)
    max_tokens: Optional[int] = Field(None, ge=1)


class TokenizeRequest(_Lenient):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Lenient):
    tokens: list[int]


def parse_body(raw, model_cls):
    """Raw request bytes -> a validated model, or APIError(400) saying what is wrong and where."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None)


def conversation_from_messages(messages):
    """OpenAI chat messages -> nanochat messages [{"role", "content": str}] that render_for_completion accepts."""
    result, total = [], 0
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages.{i}.role: {message.role!r} is not supported (system, user, assistant)",
                           param=f"messages.{i}.role")
        content = message.content
        if content is None and role != "assistant":
            raise APIError(400, f"messages.{i}.content: required for a {role} message", param=f"messages.{i}.content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages.{i}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                                    f"supported", param=f"messages.{i}.content")
            content = "".join(p["text"] for p in content)
        content = content or ""
        if len(content) > MAX_MESSAGE_CHARS:
            raise APIError(400, f"messages.{i}.content: {len(content)} characters, at most {MAX_MESSAGE_CHARS}",
                           param=f"messages.{i}.content")
        total += len(content)
        if role == "system" and result:
            raise APIError(400, f"messages.{i}: a system message may only come first", param=f"messages.{i}")
        if result and result[-1]["role"] == role:
            result[-1]["content"] += "\n\n" + content  # the template alternates user/assistant: join runs
        else:
            result.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise APIError(400, f"messages: {total} characters in all, at most {MAX_TOTAL_CHARS}", param="messages")
    if result[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    if len(result) > 1 and result[0]["role"] == "system" and result[1]["role"] != "user":
        raise APIError(400, "messages: a system message must be followed by a user message", param="messages")
    if result[0]["role"] == "assistant":
        result.insert(0, {"role": "user", "content": ""})
    return result


def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_chunk(completion_id, model, created, choices, usage_value=None, include_usage=False):
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": None, "choices": choices}
    if include_usage:
        chunk["usage"] = usage_value
    return chunk


def chat_delta(index, kind, text):
    """One streamed delta: content / reasoning_content, or a server-side tool call or its output."""
    if kind == "content":
        delta = {"content": text}
    elif kind == "reasoning":
        delta = {"reasoning_content": text}
    else:
        delta = {"server_tool": {"kind": "call" if kind == "tool_call" else "output", "text": text}}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def chat_message(items):
    """The non-streamed assistant message from a reply's (kind, text) items."""
    content = "".join(t for k, t in items if k == "content")
    reasoning = "".join(t for k, t in items if k == "reasoning")
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
    tools = []
    for kind, text in items:
        if kind == "tool_call":
            tools.append({"call": text, "output": None})
        elif kind == "tool_output" and tools:
            tools[-1]["output"] = text
    if tools:
        message["server_tools"] = tools
    return message


def now():
    return int(time.time())
