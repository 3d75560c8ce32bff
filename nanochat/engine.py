"""
Inference engine: fast sampling from a GPT with a KV cache, several samples per prompt, and tool use.

Everything is token ids; the tokenizer is only needed for the special tokens and the tools.

    engine = Engine(model, tokenizer)                    # tools="calculator" like nanochat; "python" / None
    for token_column, token_masks in engine.generate(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8):
        ...                                              # one token per row per step; mask 0 = forced by a tool
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256)

How generation works:
1. the prompt is prefilled once at batch 1; its KV cache (and the smear state) is copied into one row per sample,
   and the first token of every row is sampled independently from the same last-position logits;
2. each step samples one token per row; a row whose tool produced output gets those tokens forced instead
   (mask 0); a row stops on <|assistant_end|> or <|bos|>; the step's column is yielded, then fed back;
3. the tool state machine collects <|python_start|> ... <|python_end|>, runs the tool on the decoded text
   and queues <|output_start|> result <|output_end|> for that row.
Prompt + generated tokens never exceed the model's sequence_len: max_tokens is capped to what fits, and a
prompt that does not fit is an error (see fit_conversation_to_context to make a chat fit).

Per call: think="on"/"off" prefills the think block (yielded first, forced); tools= chooses the tools a block
may call by name (nanochat.tools); search="auto"/"force" lets the Engine call web_search itself where the answer
would begin (nanochat.auto_search, one hook per row).

`python -m dev.check_engine` checks the engine against the model's naive generate() on a checkpoint.
"""

from collections import deque
from contextlib import contextmanager
import functools

import torch
import torch.nn.functional as F

from nanochat.auto_search import auto_search_rows, check_search_mode
from nanochat.chat_format import normalize_think, think_prefill
from nanochat.cpu_decode import QUANTIZE_CHOICES, CPUDecoder
from nanochat.gpt import GPT
from nanochat.kv_cache import KVCache  # re-exported: nanochat users import KVCache from here
from nanochat.tools import get_tool, use_calculator, web_search_budget  # noqa: F401  (use_calculator: nanochat's public name)

__all__ = ["Engine", "KVCache", "sample_next_token", "use_calculator", "fit_conversation_to_context"]


# -----------------------------------------------------------------------------
# Sampling

def _sample_categorical(probs, rng):
    """One draw per row from unnormalised non-negative weights (B, K) -> (B, 1) indices.

    Inverse CDF: cumsum, one uniform per row, binary search. Same distribution as torch.multinomial but it
    draws B random numbers instead of touching a random number per vocabulary entry, much faster on CPU for
    an 8-32K vocabulary (the sampler is a visible slice of a decode step for small models; dev/PERF.md)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=rng, device=cdf.device, dtype=cdf.dtype) * total
    # strictly below the total, so the search always lands on an entry with non-zero weight
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Sample one token per row from logits (B, V). Returns (B, 1) token ids.

    temperature 0 -> argmax (rng unused, so the result does not depend on the seed); top_k keeps the k most
    likely tokens; top_p keeps the smallest set of most likely tokens whose probability reaches top_p
    (after top_k and temperature). rng: a torch.Generator on the logits' device, for reproducibility.
    """
    assert temperature >= 0.0, "temperature must be non-negative"
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    vocab_size = logits.size(-1)
    indices = None
    if top_k is not None and 0 < top_k < vocab_size:
        logits, indices = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    logits = logits / temperature
    if top_p is not None and 0.0 < top_p < 1.0:
        if indices is None:
            logits, indices = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # keep a token while the tokens ranked above it hold less than top_p (so the top token always stays)
        covered_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(covered_before >= top_p, 0.0)
    else:
        probs = F.softmax(logits, dim=-1)
    choice = _sample_categorical(probs, rng)
    return choice if indices is None else indices.gather(-1, choice)


# -----------------------------------------------------------------------------
# Generation

@contextmanager
def _intra_op_threads(num_threads):
    """Run a block with torch's intra-op thread count set to num_threads (None: unchanged)."""
    previous = torch.get_num_threads()
    if num_threads is None or num_threads == previous:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_ENGINE_TOOL = object()  # run_tool's default: the tool the Engine was built with


class RowState:
    """One sequence's tool state machine (the Engine's and the serving scheduler's): forced tokens waiting to be
    emitted, the tool block being collected, done or not, and the search the Engine owes this row ("auto"/"force"
    search, see nanochat.auto_search). Per step: `token, forced = row.choose(sampled)`, then
    `code = row.observe(token)`; a non-None code is a finished <|python_start|>...<|python_end|> block whose tool
    output (Engine.run_tool) the caller queues with row.forced_tokens.extend(...)."""

    def __init__(self, python_start=None, python_end=None, stop_tokens=(), search=None):
        self.forced_tokens = deque()
        self.in_python_block = False
        self.python_tokens = []
        self.completed = False
        self.python_start, self.python_end, self.stop_tokens = python_start, python_end, set(stop_tokens)
        self.search = search

    def choose(self, sampled):
        """The token this row emits: a queued forced token if there is one, else the sampled one."""
        if self.forced_tokens:
            return self.forced_tokens.popleft(), True
        return sampled, False

    def observe(self, token):
        """Advance the state machine by an emitted token; returns the code tokens of a tool block it closed."""
        if self.completed:
            return None  # a finished row's further tokens are ignored by callers: don't run its tools
        if token in self.stop_tokens:
            self.completed = True
        if token == self.python_start:
            self.in_python_block, self.python_tokens = True, []
        elif token == self.python_end and self.in_python_block:
            self.in_python_block = False
            code, self.python_tokens = self.python_tokens, []
            return code
        elif self.in_python_block:
            self.python_tokens.append(token)
        return None


class Engine:

    def __init__(self, model, tokenizer, tools="calculator", decode_threads=1, quantize=None, search_provider=None,
                 think_default=None):
        """tools: "calculator" (nanochat's default), "python" (runs code in the sandbox), "web_search", a list of
        these (each block is dispatched by name, see nanochat.tools), None (tool calls are not executed), or a
        function code -> str | None. search_provider: what web_search searches (nanochat.web_search).
        think_default: the model's think mode when a call does not choose one ("on", "off", None = nothing
        prefilled; scripts pass nanochat.chat_format.model_think_default(meta)).

        decode_threads: torch intra-op threads while a CPU decode step runs (restored before each yield; the
        prompt prefill keeps the process setting). One-token steps are matrix-vector products that MKL runs on
        one thread anyway, and elementwise ops on a few hundred floats don't split; what extra threads do add
        is OpenMP hand-offs, which on a busy machine stall every op (dev/PERF.md, "CPU decode"). None leaves
        the process setting alone.

        quantize: None (exact) or "int8": CPU one-token steps multiply by int8 weights (see nanochat.cpu_decode;
        faster, slightly lossy).

        On a CPU, one-token steps run through a nanochat.cpu_decode.CPUDecoder: a snapshot of the weights in the
        layout decoding wants, made at the first generate. After changing the model's weights (an optimizer
        step, load_state_dict) call weights_changed(); a forgotten call is caught by a sampled check of the
        weights at each generate, which then rebuilds the snapshot too."""
        if quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
        if quantize is not None and model.get_device().type != "cpu":
            raise ValueError(f"quantize={quantize!r} is for CPU decoding (the model is on {model.get_device()}); "
                             f"run without it on a GPU")
        self.model = model
        self.tokenizer = tokenizer
        self.tools = tools
        self.search_provider = search_provider
        self.think_default = normalize_think(think_default)
        self.tool = self._make_tool(tools)
        self.decode_threads = decode_threads
        self.quantize = quantize
        self._decoder = None

    def weights_changed(self):
        """Say the model's weights were modified or replaced: the next generate re-reads them."""
        self._decoder = None

    def _cpu_decoder(self):
        """The CPU decoder (rebuilt if the weights moved), or None on a GPU or for a model other than nanochat's GPT,
        whose math the decoder restates."""
        if self.model.get_device().type != "cpu" or not isinstance(self.model, GPT):
            return None
        if self._decoder is None or not self._decoder.is_current(self.model):
            self._decoder = CPUDecoder(self.model, quantize=self.quantize)
        return self._decoder

    def step_fns(self):
        """(prefill, step) for one generation, the weights checked once: prefill(ids (B, T), kv_cache) -> the last
        position's logits (B, 1, V) of a prompt or a chunk of one; step(ids (B, 1), kv_cache) -> logits (B, 1, V).
        On a CPU both run on the decoder's pre-cast weights, except that with quantize="int8" prompts go through the
        forward at full precision (the int8 kernel is for one-token steps, and slower on a prompt: dev/PERF.md)."""
        forward_prefill = functools.partial(self.model.forward, last_logits_only=True)
        decoder = self._cpu_decoder()
        if decoder is None:
            return forward_prefill, self.model.forward
        return (forward_prefill if decoder.quantize else decoder.prefill), decoder.step

    def _special(self, name):
        return self.tokenizer.encode_special(name)

    def _new_kv_cache(self, batch_size, seq_len):
        return KVCache.for_model(self.model, batch_size, seq_len)

    def max_new_tokens(self, num_prompt_tokens, max_tokens=None):
        """How many tokens generate() will produce at most for a prompt of this length."""
        room = self.model.config.sequence_len - num_prompt_tokens
        return room if max_tokens is None else max(0, min(max_tokens, room))

    def new_row_state(self, search=None):
        """A RowState that knows this tokenizer's tool and stop tokens (search: the row's auto-search hook)."""
        return RowState(self._special("<|python_start|>"), self._special("<|python_end|>"),
                        (self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()), search=search)

    def think_mode(self, think=None):
        """The think mode a call runs in: its own ("on"/"off"), else the Engine's think_default."""
        return self.think_default if think is None else normalize_think(think)

    def think_prefill_tokens(self, think=None):
        """The tokens generate() prefills (and yields first) for a think mode; callers that fit a chat into the
        context leave room for them."""
        think = self.think_mode(think)
        return self.tokenizer.encode(think_prefill(think)) if think else []

    def tool_for(self, tools=None, search="off"):
        """The function that runs tool blocks for a call's tools= choice (None: the Engine's own); a search mode
        other than "off" enables web_search too (the Engine's own calls go through it) and needs a provider."""
        if tools is None and search == "off":
            return self.tool
        return self._make_tool(self.tools if tools is None else tools, search)

    def _make_tool(self, tools, search="off"):
        if search != "off":
            if self.search_provider is None:
                raise ValueError(f"search={search!r} needs a search provider: Engine(..., search_provider="
                                 f"nanochat.web_search.provider_from_env()) or a LocalSearchProvider(folder)")
            if tools is None or tools == "none":
                tools = ["web_search"]
            elif not callable(tools):
                tools = [tools, "web_search"] if isinstance(tools, str) else [*tools, "web_search"]
        k, max_chars = web_search_budget(self.model.config.sequence_len)
        return get_tool(tools, search_provider=self.search_provider, search_k=k, search_max_chars=max_chars)

    def run_tool(self, code_tokens, tool=_ENGINE_TOOL):
        """Decode a finished <|python_start|>...<|python_end|> block, run the tool (default: the Engine's; None: no
        tool), return the tokens to force."""
        tool = self.tool if tool is _ENGINE_TOOL else tool
        if tool is None or not code_tokens:
            return []
        result = tool(self.tokenizer.decode(code_tokens))
        if result is None:
            return []
        return [self._special("<|output_start|>"), *self.tokenizer.encode(str(result)), self._special("<|output_end|>")]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42,
                 think=None, search="off", tools=None):
        """Yield (token_column, token_masks) per step: one token per sample, mask 1 = sampled, 0 = forced.

        Stops after max_tokens steps (capped so prompt + output fit in sequence_len), or once every row has
        produced <|assistant_end|> or <|bos|> (rows that finished early keep getting tokens until then; the
        caller ignores them, as generate_batch does). Deterministic for a given seed.

        Per call, for a chat prompt (render_for_completion's ids): think "on"/"off" (None: the Engine's
        think_default) prefills the think text (nanochat.chat_format.THINK_PREFILL): it is yielded first as forced
        tokens, then max_tokens more may follow. search "auto"/"force" makes the Engine call web_search itself
        where the answer would begin if the model does not (nanochat.auto_search). tools overrides the Engine's
        tools= for this call ("none": no tools).
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise TypeError("tokens must be a non-empty list of ints (a tokenized prompt)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        think = self.think_mode(think)
        search = check_search_mode(search)
        tool = self.tool_for(tools, search)
        searches = auto_search_rows(self.tokenizer, tokens, search, think, num_samples)
        prefill = self.think_prefill_tokens(think)
        tokens = tokens + prefill
        seq_len = self.model.config.sequence_len
        if len(tokens) >= seq_len:
            raise ValueError(f"The prompt has {len(tokens)} tokens but the model's context is {seq_len}: nothing "
                             f"can be generated. Shorten it (e.g. nanochat.engine.fit_conversation_to_context).")
        max_tokens = self.max_new_tokens(len(tokens), max_tokens)
        if max_tokens == 0:
            return
        for token in prefill:
            yield [token] * num_samples, [0] * num_samples
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1) prefill the prompt once at batch 1 (straight into the decode cache when there is one sample)
        total_len = len(tokens) + max_tokens
        kv_cache = self._new_kv_cache(1, total_len if num_samples == 1 else len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        prefill, decode_step = self.step_fns()
        logits = prefill(ids, kv_cache=kv_cache)[:, -1, :]
        if num_samples > 1:
            # 2) fan the prompt's cache out to one row per sample; every row samples its own first token
            decode_cache = self._new_kv_cache(num_samples, total_len)
            decode_cache.prefill(kv_cache)
            kv_cache = decode_cache
            logits = logits.expand(num_samples, -1)

        rows = [self.new_row_state(search) for search in searches]
        ids = torch.empty((num_samples, 1), dtype=torch.long, device=device)
        with _intra_op_threads(self.decode_threads if device.type == "cpu" else None):
            next_ids = sample_next_token(logits, rng, temperature, top_k, top_p)  # (B, 1)
        for step in range(max_tokens):
            sampled = next_ids[:, 0].tolist()
            token_column, token_masks = [], []
            any_forced = False
            for row, token in zip(rows, sampled):
                if row.search is not None and not row.forced_tokens and not row.completed:
                    row.forced_tokens.extend(row.search.before(token))  # the Engine's own web_search call
                was_done = row.completed
                token, forced = row.choose(token)
                any_forced |= forced
                token_column.append(token)
                token_masks.append(0 if forced else 1)
                code = row.observe(token)
                if code is not None:
                    row.forced_tokens.extend(self.run_tool(code, tool))
                if row.search is not None and not was_done:
                    row.search.after(token)
            yield token_column, token_masks
            if step + 1 == max_tokens or all(row.completed for row in rows):
                break
            with _intra_op_threads(self.decode_threads if device.type == "cpu" else None):
                if any_forced:
                    ids.copy_(torch.tensor(token_column, dtype=torch.long).view(-1, 1))
                else:
                    ids.copy_(next_ids)  # stays on the device: no host round trip for the common case
                logits = decode_step(ids, kv_cache=kv_cache)[:, -1, :]
                next_ids = sample_next_token(logits, rng, temperature, top_k, top_p)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate() to the end. Returns (results, masks): per sample the prompt followed by the generated
        tokens (the terminating <|assistant_end|>/<|bos|> excluded), and masks (0 for prompt and forced tokens)."""
        assistant_end, bos = self._special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if completed[i]:
                    continue
                if token == assistant_end or token == bos:
                    completed[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
            if all(completed):
                break
        return results, masks


# -----------------------------------------------------------------------------
# Context-window management

def _messages_of(conversation):
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is {'messages': [...]} or a non-empty list of messages")
    return [dict(m) for m in messages]


def _longest_fitting(lo, hi, fits):
    """Largest n in [lo, hi] with fits(n) true (fits is monotone: true up to some n), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_conversation_to_context(tokenizer, conversation, max_context, max_new_tokens=0):
    """Make a chat prompt fit the model: returns (prompt_ids, kept_conversation).

    prompt_ids = tokenizer.render_for_completion(kept_conversation) (ends with <|assistant_start|>), and
    len(prompt_ids) + max_new_tokens <= max_context (pass the model's sequence_len). kept_conversation has
    the same shape as the input (a dict gets {"messages": ...} with its other keys kept; a list stays a list);
    a trailing assistant message (the one being completed) is dropped, as render_for_completion does.

    To fit, in this order: drop the oldest user/assistant exchanges (a leading system message stays); then
    shorten the system message (keeping its beginning), dropping it if needed; then shorten the last user
    message, keeping its end (where the question usually is). Raises ValueError only when even an empty
    user message does not fit (max_context too small for the chat template plus max_new_tokens).
    """
    budget = max_context - max_new_tokens
    messages = _messages_of(conversation)
    if messages[-1].get("role") == "assistant":
        messages.pop()
    system = messages[0] if messages and messages[0].get("role") == "system" else None
    turns = messages[1:] if system is not None else messages
    if not turns or turns[-1].get("role") != "user":
        raise ValueError("the conversation must end with a user message (optionally followed by the assistant "
                         "message being completed)")

    def render(sys_msg, turn_list):
        return tokenizer.render_for_completion(([sys_msg] if sys_msg is not None else []) + turn_list)

    def result(sys_msg, turn_list, ids):
        kept = ([sys_msg] if sys_msg is not None else []) + turn_list
        if isinstance(conversation, dict):
            return ids, {**conversation, "messages": kept}
        return ids, kept

    # 1) drop whole exchanges (user + assistant) from the oldest; the last user message always stays
    while True:
        ids = render(system, turns)
        if len(ids) <= budget:
            return result(system, turns, ids)
        if len(turns) < 3:
            break
        turns = turns[2:]

    # 2) shorten the system message from its end, then drop it
    if system is not None:
        text = system.get("content", "")

        def system_fits(n):
            return len(render({**system, "content": text[:n]}, turns)) <= budget
        n = _longest_fitting(1, len(text), system_fits) if text else None
        if n is not None:
            system = {**system, "content": text[:n]}
            return result(system, turns, render(system, turns))
        system = None
        ids = render(None, turns)
        if len(ids) <= budget:
            return result(None, turns, ids)

    # 3) keep only the end of the last user message
    last = turns[-1]
    text = last.get("content", "")

    def user_fits(n):
        return len(render(None, turns[:-1] + [{**last, "content": text[len(text) - n:] if n else ""}])) <= budget
    n = _longest_fitting(0, len(text), user_fits)
    if n is None:
        raise ValueError(f"A context of {max_context} tokens cannot hold even an empty user turn plus "
                         f"{max_new_tokens} new tokens; lower max_new_tokens or use a model with a longer context")
    turns = turns[:-1] + [{**last, "content": text[len(text) - n:] if n else ""}]
    return result(None, turns, render(None, turns))
