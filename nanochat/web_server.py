"""
The HTTP server behind `python -m scripts.chat_web`: nanochat's chat UI and an OpenAI-compatible API over a
ReplicaPool of continuous-batching schedulers (nanochat.batching).

    app = create_app(pool, tokenizer, model_name="nanochat-sft-d20", sequence_len=2048)

Endpoints: GET / (the UI), /health, /stats, /v1/models; POST /v1/chat/completions, /v1/completions (stream or
not), nanochat's own POST /chat/completions stream, and vLLM's /tokenizer_info, /tokenize, /detokenize (so
lm-evaluation-harness's local-completions model tokenizes with our tokenizer). Shapes and validation:
nanochat.openai_api. Replies are parsed token by token by nanochat.text_stream.ReplyStream.
"""

import asyncio
import json
import logging
import os
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.batching import GenerationRequest, QueueFull
from nanochat.engine import fit_conversation_to_context
from nanochat.openai_api import (MAX_BODY_BYTES, MAX_PROMPTS, APIError, ChatRequest, CompletionRequest,
                                 DetokenizeRequest, NanochatChatRequest, TokenizeRequest, chat_chunk, chat_delta,
                                 chat_message, conversation_from_messages, new_id, now, parse_body, usage)
from nanochat.text_stream import ReplyStream, TokenTextStream

logger = logging.getLogger(__name__)
UI_PATH = os.path.join(os.path.dirname(__file__), "ui.html")


class StatusCounter:
    """ASGI middleware counting responses by status code (for /stats: a soak test checks there was no 5xx)."""

    def __init__(self, app, counts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)
        await self.app(scope, receive, counting_send)


class Generation:
    """Requests submitted together (one per prompt) and the replies streamed out of them, choice by choice
    (choice index = prompt index * n + sample)."""

    def __init__(self, pool, tokenizer, requests, stop=(), raw=False):
        self.requests = requests
        self.n = requests[0].num_samples
        self.streams = [ReplyStream(tokenizer, stop=stop, raw=raw) for _ in range(len(requests) * self.n)]
        self.token_counts = [0] * len(self.streams)
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for p, request in enumerate(requests):
            request.on_event = lambda event, p=p: loop.call_soon_threadsafe(self.queue.put_nowait, (p, event))
        self.replicas = []
        try:
            for request in requests:
                self.replicas.append(pool.submit(request))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), code="rate_limit_exceeded")
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e))

    def cancel(self):
        for request in self.requests:
            request.cancel()

    async def events(self):
        """Yield ("token", choice, token, logprob_entry), ("delta", choice, kind, text), ("finish", choice,
        reason), ("prompt_logprobs", prompt index, scores); a failed generation raises APIError(500)."""
        finished = set()
        while len(finished) < len(self.streams):
            p, event = await self.queue.get()
            if event[0] == "error":
                raise APIError(500, event[1], code="generation_failed")
            if event[0] == "prompt_logprobs":
                yield ("prompt_logprobs", p, event[1])
            elif event[0] == "tokens":
                for sample, token, _forced, entry in event[1]:
                    choice = p * self.n + sample
                    if choice in finished:
                        continue
                    self.token_counts[choice] += 1
                    yield ("token", choice, token, entry)
                    stream = self.streams[choice]
                    for kind, text in stream.feed(token):
                        yield ("delta", choice, kind, text)
                    if stream.stopped:  # the turn ended, or a stop string appeared: this choice is done
                        finished.add(choice)
                        self.requests[p].stop_sample(sample)
                        yield ("finish", choice, "stop")
            elif event[0] == "done":
                choice = p * self.n + event[1]
                if choice not in finished:
                    for kind, text in self.streams[choice].finish():
                        yield ("delta", choice, kind, text)
                    finished.add(choice)
                    yield ("finish", choice, event[2])


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def read_json(request, model_cls):
    """The body, size-limited (413) and validated (400)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {MAX_BODY_BYTES}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks.append(chunk)
    return parse_body(b"".join(chunks), model_cls)


async def until_done_or_disconnected(http_request, generation, coroutine):
    """Run a non-streamed generation; if the client goes away first, cancel it (its rows are freed)."""
    task = asyncio.ensure_future(coroutine)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await http_request.is_disconnected():
                task.cancel()
                return None
    finally:
        generation.cancel()


class Server:
    """What the endpoints share: the replicas, the tokenizer, the model's name and context, the defaults for what a
    request does not say (nanochat's -t/-k/-m), the API key, and the checks and prompt building every endpoint
    does the same way."""

    def __init__(self, pool, tokenizer, model_name, sequence_len, temperature, top_k, max_tokens, api_key, max_n):
        self.pool, self.tokenizer, self.model_name, self.sequence_len = pool, tokenizer, model_name, sequence_len
        self.temperature, self.top_k, self.max_tokens = temperature, top_k, max_tokens
        self.api_key, self.max_n = api_key, max_n
        self.engine = pool.schedulers[0].engine
        self.started = now()
        self.status_counts = Counter()
        self.bos, self.vocab_size = tokenizer.get_bos_token_id(), tokenizer.get_vocab_size()
        self.special_names = sorted(tokenizer.get_special_tokens(), key=len, reverse=True)

    # --- checks

    def check_auth(self, request):
        if self.api_key is not None and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def check_model(self, name):
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def request_body(self, request, model_cls):
        """The authorized request's body, validated (400 in OpenAI's shape when it is not), for this model."""
        self.check_auth(request)
        body = await read_json(request, model_cls)
        self.check_model(getattr(body, "model", None))
        return body

    # --- prompts and sampling

    def sampling(self, body, default_max_tokens, prompt_len):
        """GenerationRequest keyword arguments shared by every endpoint, checked against the context."""
        if body.n > self.max_n:
            raise APIError(400, f"n: at most {self.max_n} (the server's --max-batch)", param="n")
        top_k = self.top_k if body.top_k is None else body.top_k
        room = self.sequence_len - prompt_len
        wanted = body.requested_max_tokens(default_max_tokens)
        return dict(num_samples=body.n, temperature=self.temperature if body.temperature is None else body.temperature,
                    top_k=top_k or None, top_p=body.top_p, seed=body.seed, max_tokens=min(wanted, room))

    def chat_prompt(self, messages, wanted_tokens, think=None):
        """Fit the chat into the context as chat_cli does (oldest exchanges dropped, system kept), with room for
        the think prefill; refuse if the system or the last user message itself would have to be cut. Returns
        (prompt ids, prefill length)."""
        prefill = len(self.engine.think_prefill_tokens(think))
        reserve = max(1, min(wanted_tokens, self.sequence_len // 2)) + prefill
        try:
            prompt, kept = fit_conversation_to_context(self.tokenizer, messages, self.sequence_len,
                                                       max_new_tokens=reserve)
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded")
        cut = kept[-1] != messages[-1] or (messages[0]["role"] == "system" and kept[0] != messages[0])
        if cut:
            raise APIError(400, f"the prompt is too long: the last message (with the system message) does not fit "
                                f"this model's context of {self.sequence_len} tokens with room for {reserve} new "
                                f"tokens; shorten it or lower max_tokens", param="messages",
                           code="context_length_exceeded")
        return prompt, prefill

    def completion_prompts(self, prompt):
        """-> [(token ids, echo text, number of leading ids not echoed)] for a str / [str] / [int] / [[int]]."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if len(prompt) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request", param="prompt")
        result = []
        for p in prompt:
            if isinstance(p, str):  # text: starts a document like in training (the BOS is not echoed)
                result.append(([self.bos] + self.tokenizer.encode(p), p, 1))
            else:
                if not p or not all(0 <= t < self.vocab_size for t in p):
                    raise APIError(400, f"prompt: token ids must be a non-empty list in [0, {self.vocab_size})",
                                   param="prompt")
                result.append((list(p), self.tokenizer.decode(list(p)), 0))
        return result

    def encode_with_specials(self, text):
        ids, rest = [], text
        while rest:
            hits = [(rest.find(name), name) for name in self.special_names if name in rest]
            if not hits:
                ids += self.tokenizer.encode(rest)
                break
            at, name = min(hits)
            ids += self.tokenizer.encode(rest[:at]) + [self.tokenizer.encode_special(name)]
            rest = rest[at + len(name):]
        return ids

    def logprobs_block(self, entries, tokens, start_offset):
        """OpenAI's legacy logprobs object for tokens and their (logprob, top) entries (None: not scored)."""
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = start_offset
        for token, entry in zip(tokens, entries):
            text = self.tokenizer.decode([token])
            block["tokens"].append(text)
            block["text_offset"].append(offset)
            offset += len(text)
            block["token_logprobs"].append(None if entry is None else entry[0])
            block["top_logprobs"].append(None if entry is None else
                                         {self.tokenizer.decode([t]): lp for t, lp in entry[1]})
        return block

    def response(self, ids, kind, choices, generation, prompt_tokens):
        """The body of a finished chat.completion / text_completion."""
        return {"id": ids[0], "object": kind, "created": ids[1], "model": self.model_name,
                "system_fingerprint": None, "choices": choices,
                "usage": usage(prompt_tokens, sum(generation.token_counts))}


async def stream_events(generation, chunk, opening, delta_choice, finish_choice, prompt_tokens, include_usage):
    """An OpenAI stream: the opening chunks, one per delta and per finish, the usage chunk if asked for, an error
    event if the generation fails mid-way (the client sees why, never a cut-off stream), then [DONE]."""
    try:
        for choices in opening:
            yield chunk(choices)
        async for event in generation.events():
            if event[0] == "delta":
                yield chunk([delta_choice(event)])
            elif event[0] == "finish":
                yield chunk([finish_choice(event)])
        if include_usage:
            yield chunk([], usage(prompt_tokens, sum(generation.token_counts)))
    except APIError as e:
        yield sse(e.body())
    finally:
        generation.cancel()
    yield "data: [DONE]\n\n"


def event_stream_response(events):
    return StreamingResponse(events, media_type="text/event-stream")


def create_app(pool, tokenizer, model_name, sequence_len, temperature=0.8, top_k=50, max_tokens=512,
               api_key=None, max_n=8):
    """temperature / top_k / max_tokens: defaults for requests that do not say (nanochat's -t/-k/-m)."""
    server = Server(pool, tokenizer, model_name, sequence_len, temperature, top_k, max_tokens, api_key, max_n)
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(StatusCounter, counts=server.status_counts)
    add_error_handlers(app)
    add_status_routes(app, server)
    add_chat_routes(app, server)
    add_completion_routes(app, server)
    add_nanochat_route(app, server)
    add_tokenizer_routes(app, server)
    return app


def add_error_handlers(app):
    """Every error in OpenAI's shape; FastAPI's 422 for a bad body becomes 400 (the official client retries 5xx, so
    bad input must never be one)."""
    @app.exception_handler(APIError)
    async def api_error(_, e):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(_, e):
        logger.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)


def add_status_routes(app, server):
    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()

    @app.get("/", response_class=HTMLResponse)
    async def ui():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "model": server.model_name, "num_replicas": len(server.pool.schedulers)}

    @app.get("/stats")
    async def stats():
        return {**server.pool.stats(), "model": server.model_name, "responses_by_status": dict(server.status_counts)}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.started,
                                            "owned_by": "nanochat", "max_model_len": server.sequence_len}]}


def add_chat_routes(app, server):
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await server.request_body(request, ChatRequest)
        stop = body.stop_strings()
        messages = conversation_from_messages(body.messages)
        think = body.think_mode()
        prompt, prefill = server.chat_prompt(messages, body.requested_max_tokens(server.max_tokens), think)
        kwargs = server.sampling(body, server.max_tokens, len(prompt) + prefill)
        generation_request = GenerationRequest(prompt, use_tools=True, chat=True, think=think, search=body.search,
                                               **kwargs)
        generation = Generation(server.pool, server.tokenizer, [generation_request], stop=stop)
        ids = (new_id("chatcmpl"), now())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream_response(stream_chat(generation, ids, len(prompt), include_usage))
        result = await until_done_or_disconnected(request, generation, collect_chat(generation, ids, len(prompt)))
        return JSONResponse(result or {})

    def stream_chat(generation, ids, prompt_tokens, include_usage):
        completion_id, created = ids

        def chunk(choices, usage_value=None):
            return sse(chat_chunk(completion_id, server.model_name, created, choices, usage_value, include_usage))
        opening = [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(len(generation.streams))]]
        return stream_events(generation, chunk, opening, lambda e: chat_delta(e[1], e[2], e[3]),
                             lambda e: {"index": e[1], "delta": {}, "logprobs": None, "finish_reason": e[2]},
                             prompt_tokens, include_usage)

    async def collect_chat(generation, ids, prompt_tokens):
        items = [[] for _ in generation.streams]
        reasons = [None] * len(generation.streams)
        async for event in generation.events():
            if event[0] == "delta":
                items[event[1]].append((event[2], event[3]))
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
        choices = [{"index": i, "message": chat_message(items[i]), "logprobs": None, "finish_reason": reasons[i]}
                   for i in range(len(items))]
        return server.response(ids, "chat.completion", choices, generation, prompt_tokens)


def add_completion_routes(app, server):
    """Text in, text out; echo + logprobs score a prompt (lm-evaluation-harness's loglikelihood tasks)."""
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.request_body(request, CompletionRequest)
        stop = body.stop_strings()
        prompts = server.completion_prompts(body.prompt)
        wanted = body.requested_max_tokens(16)
        if wanted == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 only makes sense with echo (to score the prompt)", param="max_tokens")
        requests = []
        for ids, _, _ in prompts:
            if len(ids) + wanted > server.sequence_len:
                raise APIError(400, f"this model's maximum context length is {server.sequence_len} tokens, but "
                                    f"{len(ids)} prompt tokens + {wanted} max_tokens were requested", param="prompt",
                               code="context_length_exceeded")
            kwargs = server.sampling(body, 16, len(ids))
            requests.append(GenerationRequest(ids, use_tools=False, logprobs=body.logprobs,
                                              prompt_logprobs=body.echo and body.logprobs is not None, **kwargs))
        generation = Generation(server.pool, server.tokenizer, requests, stop=stop, raw=True)
        ids = (new_id("cmpl"), now())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream_response(stream_completion(generation, ids, prompts, body, include_usage))
        result = await until_done_or_disconnected(request, generation,
                                                  collect_completion(generation, ids, prompts, body))
        return JSONResponse(result or {})

    async def collect_completion(generation, ids, prompts, body):
        n = generation.n
        tokens = [[] for _ in generation.streams]
        entries = [[] for _ in generation.streams]
        prompt_scores, reasons = {}, [None] * len(generation.streams)
        async for event in generation.events():
            if event[0] == "token":
                tokens[event[1]].append(event[2])
                entries[event[1]].append(event[3])
            elif event[0] == "prompt_logprobs":
                prompt_scores[event[1]] = event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
        choices = []
        for choice, stream in enumerate(generation.streams):
            prompt_ids, prompt_text, skip = prompts[choice // n]
            logprobs = None
            if body.logprobs is not None:
                logprobs = server.logprobs_block(entries[choice], tokens[choice], len(prompt_text) if body.echo else 0)
                if body.echo:
                    echoed = server.logprobs_block(prompt_scores.get(choice // n, [])[skip:], prompt_ids[skip:], 0)
                    logprobs = {k: echoed[k] + logprobs[k] for k in logprobs}
            choices.append({"text": (prompt_text if body.echo else "") + stream.text(), "index": choice,
                            "logprobs": logprobs, "finish_reason": reasons[choice]})
        prompt_tokens = sum(len(p[0]) for p in prompts) * n
        return server.response(ids, "text_completion", choices, generation, prompt_tokens)

    def stream_completion(generation, ids, prompts, body, include_usage):
        def chunk(choices, usage_value=None):
            data = {"id": ids[0], "object": "text_completion", "created": ids[1], "model": server.model_name,
                    "system_fingerprint": None, "choices": choices}
            if include_usage:
                data["usage"] = usage_value
            return sse(data)
        opening = [[{"text": prompts[choice // generation.n][1], "index": choice, "logprobs": None,
                     "finish_reason": None}] for choice in range(len(generation.streams))] if body.echo else []
        prompt_tokens = sum(len(p[0]) for p in prompts) * generation.n
        return stream_events(generation, chunk, opening,
                             lambda e: {"text": e[3], "index": e[1], "logprobs": None, "finish_reason": None},
                             lambda e: {"text": "", "index": e[1], "logprobs": None, "finish_reason": e[2]},
                             prompt_tokens, include_usage)


def add_nanochat_route(app, server):
    """nanochat's own streaming endpoint ({"token": ...} ... {"done": true}), for its old UI and clients."""
    @app.post("/chat/completions")
    async def nanochat_chat(request: Request):
        body = await server.request_body(request, NanochatChatRequest)
        messages = conversation_from_messages(body.messages)
        wanted = body.max_tokens or server.max_tokens
        think = body.think_mode()
        prompt, prefill = server.chat_prompt(messages, wanted, think)
        request_kwargs = dict(num_samples=1, max_tokens=min(wanted, server.sequence_len - len(prompt) - prefill),
                              temperature=server.temperature if body.temperature is None else body.temperature,
                              top_k=(server.top_k if body.top_k is None else body.top_k) or None)
        generation_request = GenerationRequest(prompt, use_tools=True, chat=True, think=think, search=body.search,
                                               **request_kwargs)
        generation = Generation(server.pool, server.tokenizer, [generation_request])
        replica = server.pool.schedulers.index(generation.replicas[0])
        return event_stream_response(token_events(generation, replica))

    async def token_events(generation, replica):
        text = TokenTextStream(server.tokenizer)
        try:
            async for event in generation.events():
                if event[0] == "token":
                    piece = text.feed(event[2])
                    if piece:
                        yield sse({"token": piece, "gpu": replica})
            tail = text.close()
            if tail:
                yield sse({"token": tail, "gpu": replica})
        except APIError as e:
            yield sse(e.body())
        finally:
            generation.cancel()
        yield sse({"done": True})


def add_tokenizer_routes(app, server):
    """vLLM's tokenizer endpoints (lm-evaluation-harness's "remote" tokenizer backend)."""
    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        server.check_auth(request)
        return {"tokenizer_class": "nanochat", "bos_token": "<|bos|>", "eos_token": "<|bos|>", "pad_token": None,
                "model_max_length": server.sequence_len, "vocab_size": server.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await server.request_body(request, TokenizeRequest)
        tokens = ([server.bos] if body.add_special_tokens else []) + server.encode_with_specials(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.sequence_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await server.request_body(request, DetokenizeRequest)
        if not all(0 <= t < server.vocab_size for t in body.tokens):
            raise APIError(400, f"tokens: ids must be in [0, {server.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(body.tokens)}
