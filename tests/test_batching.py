"""Continuous batching: rows at different positions in one RaggedKVCache must decode exactly as each sequence
would alone (model forward and CPU decoder), and the Scheduler's batched greedy answers equal solo answers."""
import pytest
import torch

from nanochat.cpu_decode import CPUDecoder
from nanochat.kv_cache import KVCache, RaggedKVCache


def prefill_alone(model, tokens, seq_len):
    cache = KVCache.for_model(model, 1, seq_len)
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), kv_cache=cache)[:, -1]
    return cache, logits


def solo_continuation(model, tokens, steps, seq_len):
    """Logits of feeding `steps` one at a time after `tokens`, at batch 1 with an ordinary cache."""
    cache, _ = prefill_alone(model, tokens, seq_len)
    out = []
    with torch.inference_mode():
        for t in steps:
            out.append(model(torch.tensor([[t]]), kv_cache=cache)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("use_decoder", [False, True], ids=["model", "cpu_decoder"])
def test_ragged_rows_decode_like_each_row_alone(build_random_gpt, use_decoder):
    """Three prompts of different lengths (past the window of 8) decode together; each row's logits equal its
    solo decode, also after rows are swapped (as the scheduler compacts them) and a row leaves the batch."""
    model = build_random_gpt(seed=1)
    seq_len = 64
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 30)]
    steps = torch.randint(0, 256, (3, 12), generator=gen).tolist()
    expected = [solo_continuation(model, p, s, seq_len) for p, s in zip(prompts, steps)]

    cache = RaggedKVCache.for_model(model, max_rows=4, seq_len=seq_len)
    for row, prompt in enumerate(prompts):
        cache.insert(row + 1, prefill_alone(model, prompt, seq_len)[0])   # rows 1..3; row 0 stays free
    order = [None, 0, 1, 2]  # cache row -> which sequence
    cache.swap_rows(0, 3)
    order[0], order[3] = order[3], order[0]
    cache.active = 3
    step_fn = CPUDecoder(model).step if use_decoder else (lambda idx, kv: model(idx, kv_cache=kv))
    got = [[] for _ in prompts]
    with torch.inference_mode():
        for t in range(12):
            if t == 6:  # sequence in row 1 leaves: swap it past the active block
                cache.swap_rows(1, cache.active - 1)
                order[1], order[cache.active - 1] = order[cache.active - 1], order[1]
                cache.active -= 1
            ids = torch.tensor([[steps[order[r]][t]] for r in range(cache.active)])
            logits = step_fn(ids, cache)[:, -1]
            for r in range(cache.active):
                got[order[r]].append(logits[r])
    for i, logits in enumerate(got):
        torch.testing.assert_close(torch.stack(logits), expected[i][:len(logits)], atol=1e-4, rtol=1e-4)
    assert [len(g) for g in got].count(6) == 1  # one row really left halfway


# -----------------------------------------------------------------------------
# the Scheduler against the Engine

import queue
import threading
import time

from nanochat.batching import GenerationRequest, QueueFull, ReplicaPool, Scheduler
from nanochat.engine import Engine


def collect(request_kwargs, scheduler):
    """Submit one request; returns ({sample: tokens}, {sample: finish_reason}, other events)."""
    events = queue.Queue()
    request = GenerationRequest(on_event=events.put, **request_kwargs)
    scheduler.submit(request)
    return request, events


def drain(request, events, timeout=60):
    tokens, reasons, other = {}, {}, []
    deadline = time.monotonic() + timeout
    while len(reasons) < request.num_samples:
        event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if event[0] == "tokens":
            for sample, token, forced, _ in event[1]:
                tokens.setdefault(sample, []).append(token)
        elif event[0] == "done":
            reasons[event[1]] = event[2]
        elif event[0] == "error":
            raise AssertionError(event[1])
        else:
            other.append(event)
    return tokens, reasons, other


@pytest.fixture
def scheduler_for(request):
    started = []

    def make(engine, **kwargs):
        scheduler = Scheduler(engine, **kwargs)
        scheduler.start()
        started.append(scheduler)
        return scheduler
    yield make
    for scheduler in started:
        scheduler.stop()


@pytest.mark.parametrize("chunk", [4, 256])
def test_concurrent_greedy_answers_equal_solo_answers(build_random_gpt, byte_tokenizer, scheduler_for, chunk):
    """Prompts of different lengths arrive together (more than max_batch: some wait); each greedy answer equals
    Engine.generate_batch on that prompt alone. Chunked prefill (4 tokens) interleaves with decoding."""
    model = build_random_gpt(seed=2)
    engine = Engine(model, byte_tokenizer, tools=None)
    gen = torch.Generator().manual_seed(1)
    prompts = [[256] + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (2, 9, 25, 14, 40)]
    solo = [engine.generate_batch(p, max_tokens=20, temperature=0.0)[0][0][len(p):] for p in prompts]
    scheduler = scheduler_for(engine, max_batch=3, prefill_chunk=chunk)
    submitted = [collect(dict(prompt=p, max_tokens=20, temperature=0.0, use_tools=False), scheduler)
                 for p in prompts]
    for (request, events), expected in zip(submitted, solo):
        tokens, reasons, _ = drain(request, events)
        stop = {byte_tokenizer.encode_special("<|assistant_end|>"), byte_tokenizer.get_bos_token_id()}
        got = [t for t in tokens[0] if t not in stop]
        assert got == expected
        assert reasons[0] == ("stop" if len(tokens[0]) < 20 else "length")
    assert sum(s is not None for s in scheduler.slots) == 0 and scheduler.cache.active == 0


def test_seeded_sampling_does_not_depend_on_the_batch(build_random_gpt, byte_tokenizer, scheduler_for):
    engine = Engine(build_random_gpt(seed=3), byte_tokenizer, tools=None)
    scheduler = scheduler_for(engine, max_batch=8)
    prompt = [256, 10, 20, 30]
    kwargs = dict(prompt=prompt, max_tokens=15, temperature=1.0, top_k=50, seed=7, num_samples=2, use_tools=False)
    alone = drain(*collect(kwargs, scheduler))[0]
    others = [collect(dict(prompt=[256, 5] * k, max_tokens=15, temperature=1.0, use_tools=False), scheduler)
              for k in range(1, 4)]
    crowded = drain(*collect(kwargs, scheduler))[0]
    for other in others:
        drain(*other)
    assert alone == crowded and alone[0] != alone[1]


class ScriptedTransitions:
    """A real GPT whose logits are overridden after some tokens: after token a comes b (to make a row call a tool
    at a known point while the other rows decode whatever the GPT says)."""

    def __init__(self, model, transitions):
        self.model, self.config, self.transitions = model, model.config, transitions

    def get_device(self):
        return self.model.get_device()

    def forward(self, idx, kv_cache=None, last_logits_only=False):
        logits = self.model.forward(idx, kv_cache=kv_cache, last_logits_only=last_logits_only).clone()
        for b, last in enumerate(idx[:, -1].tolist()):
            if last in self.transitions:
                logits[b, -1, self.transitions[last]] = 1e4
        return logits


def test_a_slow_tool_parks_its_row_and_the_others_go_on(build_random_gpt, byte_tokenizer, scheduler_for):
    """Row A calls a tool that blocks until released; row B decodes to its end meanwhile. A's answer (with the
    forced output) then equals the Engine's answer with an instant tool."""
    S = byte_tokenizer.special
    trigger = 200
    model = ScriptedTransitions(build_random_gpt(seed=4), {
        trigger: S["<|python_start|>"], S["<|python_start|>"]: ord("7"), ord("7"): S["<|python_end|>"],
        S["<|output_end|>"]: S["<|assistant_end|>"]})
    release = threading.Event()
    calls = []

    def slow_tool(code):
        calls.append(code)
        release.wait(timeout=30)
        return "42"
    prompt_a, prompt_b = [256, 1, trigger], [256, 5, 6, 7]
    expected = Engine(model, byte_tokenizer, tools=lambda code: "42").generate_batch(
        prompt_a, max_tokens=30, temperature=0.0)[0][0][len(prompt_a):]
    assert S["<|output_start|>"] in expected  # the script really calls the tool
    scheduler = scheduler_for(Engine(model, byte_tokenizer, tools=slow_tool), max_batch=4)
    request_a, events_a = collect(dict(prompt=prompt_a, max_tokens=30, temperature=0.0), scheduler)
    request_b, events_b = collect(dict(prompt=prompt_b, max_tokens=30, temperature=0.0, use_tools=False), scheduler)
    drain(request_b, events_b)  # B finishes while A's tool is still blocked
    assert calls == ["7"] and not release.is_set()
    assert scheduler.cache.active == 0 and sum(s is not None for s in scheduler.slots) == 1  # A is parked
    release.set()
    tokens, reasons, _ = drain(request_a, events_a)
    assert tokens[0][:-1] == expected and reasons[0] == "stop"


class NeverStopping:
    """A model that never samples a stop token and takes at least 10 ms a step: its rows stay busy for the test's
    whole run (a random model at temperature 1 can sample one within a few tokens, and a fast machine finishes
    250 tokens before a second request is admitted)."""

    def __init__(self, model, stop_ids):
        self.model, self.config, self.stop_ids = model, model.config, list(stop_ids)

    def get_device(self):
        return self.model.get_device()

    def forward(self, idx, kv_cache=None, last_logits_only=False):
        time.sleep(0.01)
        logits = self.model.forward(idx, kv_cache=kv_cache, last_logits_only=last_logits_only).clone()
        logits[..., self.stop_ids] = float("-inf")
        return logits


def test_cancel_frees_rows_and_a_full_queue_refuses(build_random_gpt, byte_tokenizer, scheduler_for):
    stop_ids = (byte_tokenizer.encode_special("<|assistant_end|>"), byte_tokenizer.get_bos_token_id())
    model = NeverStopping(build_random_gpt(seed=5, sequence_len=256), stop_ids)
    engine = Engine(model, byte_tokenizer, tools=None)
    scheduler = scheduler_for(engine, max_batch=2, max_waiting=1)
    long = dict(prompt=[256, 1, 2], max_tokens=250, temperature=1.0, use_tools=False)
    running, deadline = [], time.monotonic() + 120  # generous: a busy 2-core machine stalls the scheduler thread
    for n in (1, 2):
        running.append(collect(long, scheduler))
        while (scheduler.cache.active < n or scheduler.waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.cache.active == n and not scheduler.waiting, "the scheduler never took the request"
    waiting = collect(long, scheduler)                # the two rows are busy: this one waits
    with pytest.raises(QueueFull):
        ReplicaPool([scheduler]).submit(GenerationRequest(**long))
    for request, _ in running + [waiting]:
        request.cancel()
    while (sum(s is not None for s in scheduler.slots) or scheduler.waiting) and time.monotonic() < deadline:
        time.sleep(0.01)  # the scheduler thread drops cancelled requests at its next step
    assert sum(s is not None for s in scheduler.slots) == 0 and not scheduler.waiting
    assert scheduler.stats()["busy_rows"] == 0



def chat_prompt(tokenizer, text):
    """A rendered one-question chat in the byte tokenizer (what render_for_completion gives)."""
    special = tokenizer.encode_special
    return ([tokenizer.get_bos_token_id(), special("<|user_start|>")] + tokenizer.encode(text)
            + [special("<|user_end|>"), special("<|assistant_start|>")])


@pytest.mark.parametrize("options", [dict(think="on"), dict(think="off"), dict(search="force"),
                                     dict(think="off", search="force")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_think_and_search_requests_equal_the_engine_alone(build_random_gpt, byte_tokenizer, scheduler_for,
                                                          search_docs, options):
    """Per request, as Engine.generate: the think prefill is emitted first (forced) and the forced web_search
    runs where the answer begins; batched greedy output, forced tokens included, equals the Engine alone."""
    engine = Engine(build_random_gpt(seed=6, sequence_len=256), byte_tokenizer, tools=None,
                    search_provider=search_docs)
    stop = {byte_tokenizer.encode_special("<|assistant_end|>"), byte_tokenizer.get_bos_token_id()}
    prompts = [chat_prompt(byte_tokenizer, q) for q in ("weather in Oslo today?", "hi")]
    solo = []
    for p in prompts:
        columns = [(column[0], mask[0]) for column, mask in engine.generate(p, max_tokens=160, temperature=0.0,
                                                                            **options)]
        cut = next((i for i, (t, _) in enumerate(columns) if t in stop), len(columns))
        solo.append(columns[:cut])
    scheduler = scheduler_for(engine, max_batch=4, prefill_chunk=8)
    submitted = [collect(dict(prompt=p, max_tokens=160, temperature=0.0, use_tools=False, chat=True, **options),
                         scheduler) for p in prompts]
    for (request, events), expected in zip(submitted, solo):
        tokens, _, _ = drain(request, events)
        assert [t for t in tokens[0] if t not in stop] == [t for t, _ in expected]
    first = solo[0]
    if "think" in options:  # the prefill came first, forced
        prefill = engine.think_prefill_tokens(options["think"])
        assert [t for t, _ in first[:len(prefill)]] == prefill and all(m == 0 for _, m in first[:len(prefill)])
    if "search" in options:  # the forced call ran: its output (the document) is in the answer, forced
        forced_text = bytes(t for t, m in first if m == 0 and t < 256).decode("utf-8", "replace")
        assert "[1] Weather in Oslo" in forced_text  # the top result, as format_results writes it
