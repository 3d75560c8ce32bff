"""The server (scripts.chat_web / nanochat.web_server) on loopback with a tiny model, driven by the official
`openai` client: chat (stream and not, usage, n, stop, seed), completions with echo + logprobs against the model's
own forward, every error class as the client's exception after one attempt, concurrent greedy answers equal to
solo answers, a disconnect freeing its row, malformed bodies answered 4xx with the server alive afterwards."""
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency: pip install -e '.[dev]'")
uvicorn = pytest.importorskip("uvicorn")

from nanochat.batching import ReplicaPool, Scheduler  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPTConfig  # noqa: E402
from nanochat.web_server import create_app  # noqa: E402

SEQ_LEN = 96
MODEL = "nanochat-test"
KEY = "sekrit"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tiny_model(build_gpt, tokenizer):
    """make() -> a 2-layer GPT with a 16-token window in a 96-token context, every parameter random (init zeroes
    the output projections: replies would not vary with the prompt)."""
    def make():
        config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4,
                           n_kv_head=2, n_embd=32, window_pattern="SL", short_window=16)
        return build_gpt(config, randomize=True)
    return make


class LiveServer:
    def __init__(self, app, pool):
        self.pool = pool
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.pool.stop()


def start_server(model, tokenizer, max_batch=4, max_waiting=64, api_key=KEY, tools=None):
    pool = ReplicaPool([Scheduler(Engine(model, tokenizer, tools=tools), max_batch=max_batch,
                                  max_waiting=max_waiting, prefill_chunk=16)])
    pool.start()
    app = create_app(pool, tokenizer, MODEL, SEQ_LEN, temperature=0.0, top_k=0, max_tokens=24, api_key=api_key,
                     max_n=max_batch)
    return LiveServer(app, pool), model


@pytest.fixture(scope="module")
def live(tiny_model, tokenizer):
    server, model = start_server(tiny_model(), tokenizer)
    server.model, server.tokenizer = model, tokenizer
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, text, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def solo_reply(live, tokenizer, text, max_tokens=24):
    """What the Engine alone answers (greedy), decoded the way the server shows content."""
    from nanochat.text_stream import ReplyStream
    prompt = tokenizer.render_for_completion([{"role": "user", "content": text}])
    tokens = [t[0] for t, _ in Engine(live.model, tokenizer, tools=None).generate(
        prompt, max_tokens=max_tokens, temperature=0.0)]
    stream = ReplyStream(tokenizer)
    for t in tokens:
        stream.feed(t)
    stream.finish()
    return stream.text()


# -----------------------------------------------------------------------------
# chat

def test_chat_non_stream_matches_the_engine(live, client, tokenizer):
    reply = ask(client, "hello there", temperature=0.0, max_tokens=24)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == solo_reply(live, tokenizer, "hello there")
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hello there"}])
    assert reply.usage.prompt_tokens == len(prompt) and 0 < reply.usage.completion_tokens <= 24


def test_chat_stream_with_usage(live, client, tokenizer):
    chunks = list(ask(client, "how are you?", temperature=0.0, max_tokens=24, stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == solo_reply(live, tokenizer, "how are you?")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_think_field_returns_reasoning_apart_from_the_answer(live, client, tokenizer):
    """think "on" prefills <think>: what the model writes inside goes to reasoning_content, never to content.
    The tiny model never closes its think within 24 tokens, so there is no answer (content empty); vLLM's
    chat_template_kwargs.enable_thinking means the same."""
    from nanochat.text_stream import ReplyStream
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hello there"}])
    tokens = [t[0] for t, _ in Engine(live.model, tokenizer, tools=None).generate(
        prompt, max_tokens=24, temperature=0.0, think="on")]
    expected = ReplyStream(tokenizer)
    for t in tokens:
        expected.feed(t)
    expected.finish()
    for extra in ({"think": "on"}, {"chat_template_kwargs": {"enable_thinking": True}}):
        reply = ask(client, "hello there", temperature=0.0, max_tokens=24, extra_body=extra)
        message = reply.choices[0].message
        assert message.reasoning_content and "<think>" not in message.reasoning_content
        assert message.content == expected.text() == ""
        streamed = list(ask(client, "hello there", temperature=0.0, max_tokens=24, stream=True, extra_body=extra))
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed if c.choices)
        assert reasoning == message.reasoning_content
    off = ask(client, "hello there", temperature=0.0, max_tokens=24, extra_body={"think": "off"})
    assert not off.choices[0].message.reasoning_content


def test_search_without_a_provider_and_a_bad_think_are_400(live, client):
    with pytest.raises(openai.BadRequestError, match="search provider"):
        ask(client, "weather today?", max_tokens=8, extra_body={"search": "auto"})
    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", max_tokens=8, extra_body={"think": "maybe"})


def test_n_seed_and_stop(client):
    a = ask(client, "numbers", temperature=1.0, top_p=0.9, max_tokens=16, n=3, seed=11)
    b = ask(client, "numbers", temperature=1.0, top_p=0.9, max_tokens=16, n=3, seed=11)
    c = ask(client, "numbers", temperature=1.0, top_p=0.9, max_tokens=16, n=3, seed=12)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert len(a.choices) == 3 and texts(a) == texts(b) and texts(a) != texts(c)
    assert len(set(texts(a))) > 1
    full = ask(client, "hello", temperature=0.0, max_tokens=24).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = ask(client, "hello", temperature=0.0, max_tokens=24, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(
        client, "hello", temperature=0.0, max_tokens=24, stop=stop, stream=True) if ch.choices)
    assert streamed == cut.message.content


def test_concurrent_greedy_answers_equal_solo_answers(live, client, tokenizer):
    questions = ["hello", "how are you? " * 3, "1 2 3", "café", "I am fine. numbers", "東京"]
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: ask(client, q, temperature=0.0, max_tokens=20).choices[0].message.content,
                                questions))
    assert replies == [solo_reply(live, tokenizer, q, max_tokens=20) for q in questions]


# -----------------------------------------------------------------------------
# completions

def test_completions_echo_logprobs_score_the_prompt(live, client, tokenizer):
    """lm-evaluation-harness's loglikelihood request: token prompts, echo, logprobs=1, max_tokens=1, T=0."""
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("hello there, how are you?")
    reply = client.completions.create(model=MODEL, prompt=[prompt], echo=True, logprobs=1, max_tokens=1,
                                      temperature=0)
    lp = reply.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    with torch.inference_mode():
        logp = torch.log_softmax(live.model(torch.tensor([prompt])).float()[0], dim=-1)
    expected = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
    greedy = int(logp[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(logp[-1, greedy].item(), abs=1e-4)
    assert lp.top_logprobs[-1] == {tokenizer.decode([greedy]): pytest.approx(logp[-1, greedy].item(), abs=1e-4)}
    assert reply.choices[0].text.startswith(tokenizer.decode(prompt))


def test_completions_text_batch_and_stream(client):
    reply = client.completions.create(model=MODEL, prompt=["hello", "numbers 1 2"], max_tokens=5, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1] and all(c.finish_reason for c in reply.choices)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="hello", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == reply.choices[0].text


def test_models_health_stats_and_tokenizer_endpoints(live, client, tokenizer):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert requests.get(live.url + "/health").json()["ready"] is True
    stats = requests.get(live.url + "/stats").json()
    assert {"replicas", "busy_rows", "queue_length", "tokens_served", "tokens_per_second"} <= set(stats)
    auth = {"Authorization": f"Bearer {KEY}"}
    tokens = requests.post(live.url + "/tokenize", json={"prompt": "<|bos|>hello"}, headers=auth).json()["tokens"]
    assert tokens == [tokenizer.get_bos_token_id()] + tokenizer.encode("hello")
    assert requests.post(live.url + "/detokenize", json={"tokens": tokens[1:]}, headers=auth).json()["prompt"] == "hello"
    assert requests.get(live.url + "/tokenizer_info", headers=auth).json()["eos_token"] == "<|bos|>"


# -----------------------------------------------------------------------------
# errors: each is the client's matching exception, after exactly one request

def count_requests(live):
    return sum(requests.get(live.url + "/stats").json()["responses_by_status"].values())


@pytest.mark.parametrize("call, error", [
    (lambda c: ask(c, "hi", temperature=5.0), "BadRequestError"),
    (lambda c: ask(c, "hi", n=0), "BadRequestError"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[]), "BadRequestError"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}]), "BadRequestError"),
    (lambda c: ask(c, "x" * 40_000), "BadRequestError"),
    (lambda c: ask(c, "hello " * 200), "BadRequestError"),  # does not fit the context of 96 tokens
    (lambda c: c.completions.create(model=MODEL, prompt=[10**9], max_tokens=1), "BadRequestError"),
    (lambda c: c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}]), "NotFoundError"),
    (lambda c: ask(c, "x" * 900_000 + "y" * 200_000), "APIStatusError"),  # 413
])
def test_errors_are_openai_exceptions_after_one_attempt(live, call, error):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY)  # default retries: must not retry these
    before = count_requests(live)
    with pytest.raises(getattr(openai, error)) as info:
        call(client)
    assert info.value.status_code < 500
    body = info.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["message"]
    assert count_requests(live) - before == 2  # the failed request + the /stats read itself
    if error == "APIStatusError":
        assert info.value.status_code == 413


def test_wrong_key_is_401(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_malformed_bodies_are_4xx_and_the_server_lives(live, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [b"{", b"[]", b"null", b'{"messages": "hi"}', b'{"messages": [{"role": "user"}]}',
              b'{"messages": [{"role": "user", "content": 5}]}', b"\xff\xfe", b'{"prompt": {}}',
              json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(),
              json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 9}).encode(),
              json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode()]
    for path in ("/v1/chat/completions", "/v1/completions", "/chat/completions"):
        for body in bodies:
            if path == "/chat/completions" and b'"stop"' in body:
                continue  # nanochat's own endpoint has no stop field (unknown fields are ignored)
            response = requests.post(live.url + path, data=body, headers=auth, timeout=30)
            assert 400 <= response.status_code < 500, (path, body, response.text)
            assert "error" in response.json()
    assert ask(client, "still there?", max_tokens=3).choices[0].message.content is not None
    assert requests.get(live.url + "/nope").status_code == 404


def test_queue_full_is_429(tiny_model, tokenizer):
    server, _ = start_server(tiny_model(), tokenizer, max_batch=1, max_waiting=1, api_key=None)
    cache = server.pool.schedulers[0].cache
    advance = cache.advance
    cache.advance = lambda n: (time.sleep(0.05), advance(n))  # slow steps: the first stream outlives the test
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        # seeded: a random model samples a stop token now and then, and these rows must outlive the test
        streams = [ask(client, "hello", max_tokens=60, temperature=1.0, seed=0, stream=True)]
        deadline = time.monotonic() + 10
        while server.pool.stats()["busy_rows"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the first one decodes: the queue is empty again
        streams.append(ask(client, "hello", max_tokens=60, temperature=1.0, seed=0, stream=True))
        with pytest.raises(openai.RateLimitError):
            for _ in range(5):  # one decoding, one waiting: the next ones are refused
                ask(client, "hello", max_tokens=2)
        for s in streams:
            s.close()
    finally:
        server.stop()


def test_disconnect_frees_the_row(live, monkeypatch):
    scheduler = live.pool.schedulers[0]
    advance = scheduler.cache.advance
    monkeypatch.setattr(scheduler.cache, "advance", lambda n: (time.sleep(0.05), advance(n)))  # 90 steps: 4.5 s
    served = scheduler.stats()["tokens_served"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 90, "stream": True,
            "temperature": 1.0, "top_k": 0, "seed": 0}
    with requests.post(live.url + "/v1/chat/completions", json=body, timeout=30, stream=True,
                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        data = (line for line in response.iter_lines() if line.startswith(b"data: "))
        next(data)  # the role chunk
        next(data)  # the first token: the row is decoding
        assert scheduler.stats()["busy_rows"] == 1
    deadline = time.monotonic() + 10
    while scheduler.stats()["busy_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.stats()["busy_rows"] == 0
    assert scheduler.stats()["tokens_served"] - served < 60  # it stopped long before its 90 tokens


def test_nanochat_stream_endpoint(live):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    response = requests.post(live.url + "/chat/completions", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {KEY}"})
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == {"done": True} and all("token" in e for e in events[:-1])


# -----------------------------------------------------------------------------
# the script itself

def test_chat_web_script_serves_a_checkpoint(tokenizer, tiny_model, save_tokenizer, save_model_checkpoint,
                                             _isolated_base_dir):
    base = str(_isolated_base_dir)
    save_tokenizer(tokenizer, base)
    save_model_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), 1, tiny_model())
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": base}
    process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--host",
                                "127.0.0.1", "--port", str(port), "--max-batch", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health").json()
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["model"] == "nanochat-sft-d2"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="nanochat-sft-d2", max_tokens=4,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert "<html" in requests.get(f"http://127.0.0.1:{port}/").text.lower() or requests.get(
            f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=20)


# -----------------------------------------------------------------------------
# the UI in headless Chromium (Debian's chromium package, driven by playwright)

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_ui_streams_stops_regenerates_and_never_injects(live, browser, monkeypatch):
    scheduler = live.pool.schedulers[0]
    advance = scheduler.cache.advance
    monkeypatch.setattr(scheduler.cache, "advance", lambda n: (time.sleep(0.03), advance(n)))  # visible streaming
    page = browser.new_page(viewport={"width": 390, "height": 800})  # phone width
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(live.url + "/")
    box = page.locator("#input")

    def send(text):
        box.fill(text)
        box.press("Enter")
    send("/key " + KEY)
    send("/temperature 0")
    send("/topk 0")
    send("hello there")
    reply = page.locator(".msg.assistant .bubble").last
    page.wait_for_function("document.querySelector('.msg.assistant .bubble').textContent.length > 0")
    partial = reply.text_content()
    page.wait_for_selector("#stop", state="hidden", timeout=30_000)
    final = reply.text_content()
    assert partial and final.startswith(partial.rstrip("▍")) and len(final) > len(partial)  # it streamed

    page.locator(".msg.assistant .regenerate").last.click()  # same answer at temperature 0, still one reply
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_selector("#stop", state="hidden", timeout=30_000)
    assert page.locator(".msg.assistant").count() == 1 and reply.text_content() == final

    send("tell me more")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .bubble')[1].textContent.length > 0")
    page.click("#stop")
    page.wait_for_selector("#stop", state="hidden")
    deadline = time.monotonic() + 10
    while scheduler.stats()["busy_rows"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.stats()["busy_rows"] == 0  # stopping freed the row on the server

    send('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>')
    page.wait_for_selector("#stop", state="hidden", timeout=30_000)
    assert "<img src=x" in page.locator(".msg.user .bubble").last.text_content()  # shown as text
    assert page.evaluate("document.querySelectorAll('.msg img, .msg script').length") == 0
    html = page.evaluate("renderMarkdown('**bold** and `x<y` <img src=x onerror=alert(1)>\\n- item\\n```py\\na<b\\n```')")
    assert "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html and "<li>item</li>" in html
    assert "<pre><code>a&lt;b\n</code></pre>" in html and "<img" not in html
    page.evaluate("renderReply(document.querySelector('.msg.assistant'), "
                  "[{kind: 'content', text: '<img src=x onerror=\"window.pwned=3\">'}], false)")
    time.sleep(0.2)
    assert page.evaluate("window.pwned") is None and page.evaluate("document.querySelectorAll('.msg img').length") == 0

    page.locator(".msg.user .bubble").first.click()  # edit the first question: the conversation restarts there
    page.locator("textarea.editing").fill("a new question")
    page.locator("textarea.editing").press("Enter")
    page.wait_for_selector("#stop", state="hidden", timeout=30_000)
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.user .bubble").text_content() == "a new question"
    assert all(url.startswith(live.url) for url in requested), [u for u in requested if not u.startswith(live.url)]
    page.close()
