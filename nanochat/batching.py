"""
Continuous batching: one Scheduler thread per model replica decodes every active request together, one token per
row per model step, each row at its own position in a RaggedKVCache.

    scheduler = Scheduler(Engine(model, tokenizer), max_batch=8)
    scheduler.start()
    request = GenerationRequest(prompt_ids, max_tokens=64, temperature=0.0, on_event=print)
    scheduler.submit(request)       # raises QueueFull when max_waiting requests already wait
    ...                             # events arrive on request.on_event (from the scheduler thread)
    request.cancel()                # e.g. the client went away: its rows are freed at the next step

Each loop iteration:
1. drop cancelled requests (their rows are freed at once), bring back rows whose tool has finished;
2. prefill: the oldest waiting request (if enough rows are free) runs one chunk of at most `prefill_chunk` prompt
   tokens through a batch-1 KVCache, so a long prompt delays the others by one chunk per step, not by the whole
   prompt; after its last chunk the first token of every sample is sampled from the prompt's last logits (as
   Engine.generate does) and the prompt's K/V is copied into one free row per sample;
3. decode: one forward over the active rows; each request samples its rows with its own seeded generator
   (nanochat.engine.sample_next_token), so its output does not depend on who else is in the batch; every row
   steps the Engine's tool state machine (RowState). A closed tool block runs in a thread pool
   (Engine.run_tool); if the result is not there when the row needs its next token, the row is parked outside
   the active block and rejoins when the tool is done, so a slow tool never stalls the other rows.

Events (on_event is called from the scheduler thread; keep it cheap and thread-safe):
    ("prompt_logprobs", [None, (logprob, [(token, logprob), ...]), ...])   once, if prompt_logprobs was asked
    ("tokens", [(sample, token, forced, logprob_entry_or_None), ...])       once per step with new tokens
    ("done", sample, "stop" | "length")                                     per sample
    ("error", message)                                                       the request failed; nothing follows
"""

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from nanochat.auto_search import auto_search_rows, check_search_mode
from nanochat.engine import sample_next_token
from nanochat.kv_cache import KVCache, RaggedKVCache

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every replica's waiting queue is full: the caller should answer 429 (try again later)."""


class GenerationRequest:
    """What the scheduler needs to serve one request. Tokens in, events out.

    max_tokens: new tokens per sample (the caller caps it to fit the context). logprobs: None, or how many top
    alternatives to report with each generated token (0 = just the chosen token's). prompt_logprobs: also score
    every prompt token (for echo). use_tools: run the Engine's tool on closed tool blocks. chat: the prompt is a
    rendered chat (render_for_completion); then, as Engine.generate: think "on"/"off" (None: the Engine's think_default) prefills the think text, which every
    sample emits first as forced tokens (not counted in max_tokens); search "auto"/"force" makes the scheduler call
    web_search where the answer begins if the model does not (nanochat.auto_search)."""

    def __init__(self, prompt, max_tokens, num_samples=1, temperature=1.0, top_k=None, top_p=None, seed=None,
                 use_tools=True, logprobs=None, prompt_logprobs=False, on_event=None, chat=False, think=None,
                 search="off"):
        self.prompt = list(prompt)
        self.chat, self.think, self.search = chat, think, search
        self.think_prefill = []   # set by the scheduler from the Engine's think mode
        self.tool = None          # the tool runner for this request's search mode (set by the scheduler)
        self.search_hooks = None
        self.max_tokens, self.num_samples = max_tokens, num_samples
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = random.getrandbits(63) if seed is None else seed
        self.use_tools, self.logprobs, self.prompt_logprobs = use_tools, logprobs, prompt_logprobs
        self.on_event = on_event or (lambda event: None)
        self.cancelled = False
        self.stopped_samples = set()  # samples the consumer has finished with (e.g. a stop string appeared)
        self.scheduler = None
        self.rng = None
        self.rows_left = num_samples

    def cancel(self):
        """Stop every sample (the client went away): the scheduler frees the rows at its next step."""
        self.cancelled = True
        if self.scheduler is not None:
            self.scheduler.wake()

    def stop_sample(self, sample):
        """Stop one sample (its reply is complete, e.g. at a stop string); the others go on."""
        self.stopped_samples.add(sample)
        if self.scheduler is not None:
            self.scheduler.wake()


class _Row:
    """One sample of a request occupying a row of the cache."""

    def __init__(self, request, sample, state):
        self.request, self.sample, self.state = request, sample, state
        self.slot = None          # its row in the cache
        self.feed_token = None    # the token the next forward feeds
        self.generated = 0
        self.tool_future = None   # a running tool whose output this row waits for
        self.parked_sample = None  # the sample drawn for it when it was parked


def _logprob_entries(logits, chosen, k):
    """[(logprob of chosen[i], [(token, logprob)] top k)] for rows of logits (N, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(1, chosen.view(-1, 1).to(logp.device))[:, 0].tolist()
    if not k:
        return [(lp, []) for lp in chosen_lp]
    values, indices = logp.topk(k, dim=-1)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(chosen_lp, indices.tolist(), values.tolist())]


class Scheduler(threading.Thread):

    def __init__(self, engine, max_batch=8, prefill_chunk=256, max_waiting=32, tool_workers=4, name="replica-0"):
        super().__init__(name=name, daemon=True)
        self.engine, self.model = engine, engine.model
        self.device = self.model.get_device()
        self.max_batch, self.prefill_chunk, self.max_waiting = max_batch, prefill_chunk, max_waiting
        seq_len = self.model.config.sequence_len
        self.cache = RaggedKVCache.for_model(self.model, max_batch, seq_len)
        self.prefill_cache = KVCache.for_model(self.model, 1, seq_len)
        self.slots = [None] * max_batch   # cache row -> _Row (rows [0, cache.active) are decoding)
        self.waiting = deque()
        self.prefilling, self.prefill_pos, self.prompt_scores = None, 0, []
        self.tools = ThreadPoolExecutor(max_workers=tool_workers, thread_name_prefix=f"{name}-tool")
        self.condition = threading.Condition()
        self.stopping = False
        self.tokens_served = 0
        self.recent = deque()  # (time, tokens) of recent steps, for tok/s

    # --- called from other threads

    def submit(self, request):
        if request.num_samples > self.max_batch:
            raise ValueError(f"n={request.num_samples} is more than this server's --max-batch {self.max_batch}")
        with self.condition:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self._resolve_chat_options(request)
            request.scheduler = self
            self.waiting.append(request)
            self.condition.notify()

    def _resolve_chat_options(self, request):
        """Turn a request's think/search choices into what the loop uses (raises ValueError for a bad choice,
        e.g. a search mode without a search provider): the think prefill, which joins the prompt; the tool
        runner; one auto-search hook per sample."""
        engine = self.engine
        think = engine.think_mode(request.think) if request.chat else None
        search = check_search_mode(request.search) if request.chat else "off"
        request.tool = engine.tool_for(None, search) if request.use_tools or search != "off" else None
        request.search_hooks = auto_search_rows(engine.tokenizer, request.prompt, search, think, request.num_samples)
        request.think_prefill = engine.think_prefill_tokens(think) if think else []
        request.prompt = request.prompt + request.think_prefill

    def wake(self):
        with self.condition:
            self.condition.notify()

    def stop(self):
        self.stopping = True
        self.wake()
        self.tools.shutdown(wait=False, cancel_futures=True)

    def load(self):
        """Rows in use plus rows the waiting requests will need: what a dispatcher balances."""
        return (sum(s is not None for s in self.slots) + sum(r.num_samples for r in list(self.waiting))
                + (self.prefilling.num_samples if self.prefilling is not None else 0))

    def stats(self):
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= 10.0]
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        return {"name": self.name, "device": str(self.device), "max_batch": self.max_batch,
                "busy_rows": sum(s is not None for s in self.slots), "decoding_rows": self.cache.active,
                "queue_length": len(self.waiting) + (self.prefilling is not None),
                "tokens_served": self.tokens_served,
                "tokens_per_second": round(sum(n for _, n in recent) / span, 1) if span > 0 else 0.0}

    # --- the scheduler thread

    def run(self):
        prefill, decode_step = self.engine.step_fns()  # one weight snapshot for the server's life
        with torch.inference_mode():
            while not self.stopping:
                try:
                    self._iteration(prefill, decode_step)
                except Exception as e:  # a failed step fails the requests in flight, never the server
                    logger.exception("scheduler step failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _iteration(self, prefill, decode_step):
        self._drop_cancelled()
        self._resume_tools()
        worked = False
        if self.prefilling is None:
            self._start_prefill()
        if self.prefilling is not None:
            self._prefill_chunk(prefill)
            worked = True
        if self.cache.active:
            self._decode(decode_step)
            worked = True
        if not worked:
            with self.condition:
                if not self.waiting and not self.stopping:
                    self.condition.wait(timeout=0.1)

    def _free_rows(self):
        return [i for i, s in enumerate(self.slots) if s is None]

    def _swap(self, a, b):
        self.cache.swap_rows(a, b)
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]
        for i in (a, b):
            if self.slots[i] is not None:
                self.slots[i].slot = i

    def _activate(self, row):
        """Move an occupied row that is not decoding into the active block."""
        self._swap(row.slot, self.cache.active)
        self.cache.active += 1

    def _deactivate(self, row):
        """Move a decoding row just past the active block (it stays occupied)."""
        self._swap(row.slot, self.cache.active - 1)
        self.cache.active -= 1

    def _release(self, row):
        if row.slot < self.cache.active:
            self._deactivate(row)
        self.slots[row.slot] = None
        self.cache.clear_row(row.slot)

    def _drop_cancelled(self):
        with self.condition:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling = None
        for row in [s for s in self.slots
                    if s is not None and (s.request.cancelled or s.sample in s.request.stopped_samples)]:
            self._release(row)

    def _resume_tools(self):
        events = {}
        for row in [s for s in self.slots[self.cache.active:] if s is not None]:
            if row.tool_future is not None and row.tool_future.done():
                self._take_tool_output(row)
                self._activate(row)
                self._emit(row, row.parked_sample, None, events)
        self._flush(events)

    def _take_tool_output(self, row):
        try:
            row.state.forced_tokens.extend(row.tool_future.result())
        except Exception:  # a tool that crashed gives no output, like a refused calculator expression
            logger.exception("tool failed")
        row.tool_future = None

    # --- prefill

    def _start_prefill(self):
        with self.condition:
            if not self.waiting or self.waiting[0].num_samples > len(self._free_rows()):
                return
            request = self.waiting.popleft()
        request.rng = torch.Generator(device=self.device)
        request.rng.manual_seed(request.seed)
        self.prefilling, self.prefill_pos, self.prompt_scores = request, 0, [None]
        self.prefill_cache.reset()

    def _prefill_chunk(self, prefill):
        request = self.prefilling
        prompt, start = request.prompt, self.prefill_pos
        end = min(start + self.prefill_chunk, len(prompt))
        ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)
        if request.prompt_logprobs:
            logits = self.model.forward(ids, kv_cache=self.prefill_cache)[0]
            targets = prompt[start + 1:end + 1]  # what each position predicts, within the prompt
            if targets:
                k = request.logprobs or 0
                self.prompt_scores += _logprob_entries(logits[:len(targets)], torch.tensor(targets), k)
        else:
            logits = prefill(ids, kv_cache=self.prefill_cache)[0]
        self.prefill_pos = end
        if end == len(prompt):
            self.prefilling = None
            self._admit(request, logits[-1:])

    def _admit(self, request, last_logits):
        """The prompt is in prefill_cache: sample every row's first token and give each sample a row."""
        if request.prompt_logprobs:
            request.on_event(("prompt_logprobs", self.prompt_scores))
        if request.max_tokens == 0:
            for sample in range(request.num_samples):
                request.on_event(("done", sample, "length"))
            return
        logits = last_logits.expand(request.num_samples, -1)
        sampled = sample_next_token(logits, request.rng, request.temperature, request.top_k, request.top_p)
        entries = (_logprob_entries(logits, sampled[:, 0], request.logprobs) if request.logprobs is not None
                   else [None] * request.num_samples)
        events = {}
        for sample, (token, entry) in enumerate(zip(sampled[:, 0].tolist(), entries)):
            for prefilled in request.think_prefill:  # already in the cache: emitted, not fed again
                events.setdefault(request, []).append(("token", sample, prefilled, True, None))
            row = _Row(request, sample, self.engine.new_row_state(search=request.search_hooks[sample]))
            row.slot = self._free_rows()[0]
            self.slots[row.slot] = row
            self.cache.insert(row.slot, self.prefill_cache)
            self._activate(row)
            self._emit(row, token, entry, events)
        self._flush(events)

    # --- decode

    def _decode(self, decode_step):
        rows = self.slots[:self.cache.active]
        ids = torch.tensor([[row.feed_token] for row in rows], dtype=torch.long, device=self.device)
        logits = decode_step(ids, kv_cache=self.cache)[:, -1, :]
        by_request = {}
        for i, row in enumerate(rows):
            by_request.setdefault(row.request, []).append(i)
        sampled, entries = [None] * len(rows), [None] * len(rows)
        for request, indices in by_request.items():
            index = torch.tensor(indices, device=logits.device)
            request_logits = logits.index_select(0, index)
            tokens = sample_next_token(request_logits, request.rng, request.temperature, request.top_k,
                                       request.top_p)[:, 0]
            if request.logprobs is not None:
                for i, entry in zip(indices, _logprob_entries(request_logits, tokens, request.logprobs)):
                    entries[i] = entry
            for i, token in zip(indices, tokens.tolist()):
                sampled[i] = token
        events = {}
        for row, token, entry in zip(rows, sampled, entries):
            if row.tool_future is not None:
                if not row.tool_future.done():  # park it: the others go on while its tool runs
                    row.parked_sample = token
                    self._deactivate(row)
                    continue
                self._take_tool_output(row)
            self._emit(row, token, entry, events)
        self._flush(events)
        now = time.monotonic()
        self.recent.append((now, len(rows)))
        while self.recent and now - self.recent[0][0] > 10.0:
            self.recent.popleft()

    def _emit(self, row, sampled, entry, events):
        """The row's next token: forced by its tool or the sample; then the state machine and the stop rules."""
        request, state = row.request, row.state
        if state.search is not None and not state.forced_tokens and not state.completed:
            state.forced_tokens.extend(state.search.before(sampled))  # the scheduler's own web_search call
        was_done = state.completed
        token, forced = state.choose(sampled)
        code = state.observe(token)
        if code is not None and request.tool is not None:
            row.tool_future = self.tools.submit(self.engine.run_tool, code, request.tool)
            row.tool_future.add_done_callback(lambda _: self.wake())
        if state.search is not None and not was_done:
            state.search.after(token)
        row.feed_token = token
        row.generated += 1
        self.tokens_served += 1
        events.setdefault(request, []).append(("token", row.sample, token, forced, None if forced else entry))
        if row.state.completed or row.generated >= request.max_tokens:
            events[request].append(("done", row.sample, "stop" if row.state.completed else "length"))
            self._release(row)

    def _flush(self, events):
        """One ("tokens", ...) event per request for this step, then its ("done", ...) events."""
        for request, items in events.items():
            tokens = [item[1:] for item in items if item[0] == "token"]
            if tokens:
                request.on_event(("tokens", tokens))
            for item in items:
                if item[0] == "done":
                    request.on_event(item)

    def _fail_all(self, message):
        requests = {s.request for s in self.slots if s is not None}
        if self.prefilling is not None:
            requests.add(self.prefilling)
        self.slots = [None] * self.max_batch
        self.cache.active = 0
        for row in range(self.max_batch):
            self.cache.clear_row(row)
        self.prefilling = None
        for request in requests:
            request.on_event(("error", message))


class ReplicaPool:
    """The schedulers of all replicas (one per GPU, one on CPU); a request goes to the least loaded one."""

    def __init__(self, schedulers):
        self.schedulers = list(schedulers)

    def start(self):
        for scheduler in self.schedulers:
            scheduler.start()

    def stop(self):
        for scheduler in self.schedulers:
            scheduler.stop()

    def submit(self, request):
        for scheduler in sorted(self.schedulers, key=lambda s: s.load()):
            try:
                scheduler.submit(request)
                return scheduler
            except QueueFull:
                continue
        raise QueueFull("the server is busy: every replica's queue is full; retry in a moment")

    def stats(self):
        replicas = [s.stats() for s in self.schedulers]
        return {"replicas": replicas,
                "busy_rows": sum(r["busy_rows"] for r in replicas),
                "queue_length": sum(r["queue_length"] for r in replicas),
                "tokens_served": sum(r["tokens_served"] for r in replicas),
                "tokens_per_second": round(sum(r["tokens_per_second"] for r in replicas), 1)}
