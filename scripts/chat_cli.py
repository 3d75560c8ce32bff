"""
Chat with a trained model in the terminal (single device).

    python -m scripts.chat_cli                          # interactive, the latest SFT model
    python -m scripts.chat_cli -p "What is your name?"  # one answer, then exit
    python -m scripts.chat_cli -i base -g d4 -s 400 -t 0.0

Type 'clear' to start over and 'quit' / 'exit' (or Ctrl-D) to leave, '/think' to switch think mode on or off
('/think on|off|default'). Answers stream as they are sampled; tool calls show up as <<call=result>>; reasoning
shows as <think>...</think>, and a think that is still open when --max-tokens runs out is reported as no answer.

    python -m scripts.chat_cli --think on --tools calculator,web_search --search auto --search-docs nanochat/data/search_docs

Long conversations never overflow the model's context: the
oldest exchanges are dropped (and, if needed, the start of a very long message) so that the prompt plus
the answer fit in the model's sequence length. Ctrl-C while an answer streams stops it and keeps the chat
(without that question and its partial answer).
"""

import argparse
import logging
import sys

import torch

from nanochat.chat_format import (THINK_MODES, assistant_content, assistant_parts_from_tokens, model_think_default,
                                  split_reasoning)
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init, autodetect_device_type
from nanochat.engine import Engine, fit_conversation_to_context
from nanochat.text_stream import TokenTextStream
from nanochat.tools import TOOL_NAMES
from nanochat.web_search import SEARCH_DOCS_ENV, SEARCH_URL_ENV, provider_from_env


def build_parser():
    parser = argparse.ArgumentParser(description="Chat with a nanochat model",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-i", "--source", type=str, default="sft",
                        help="which checkpoints to load: base|mid|sft|rl|dpo, or a folder written by "
                             "scripts.export_hf, or a hub repo id (org/name)")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("-m", "--max-tokens", type=int, default=256, help="max tokens per answer")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed of the first answer (then +1 per turn)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="CPU only: decode with int8 weights (about 2x faster on small models, slightly lossy)")
    parser.add_argument("--device-type", type=str, default="", choices=["", "cuda", "cpu", "mps"],
                        help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--think", type=str, default=None, choices=list(THINK_MODES),
                        help="think mode: on (the answer starts with <think>), off (an empty think block); "
                             "default: the model's (chat_sft --think-default); '/think' switches it while chatting")
    parser.add_argument("--tools", type=str, default="calculator",
                        help=f"comma-separated tools the model may call: {','.join(TOOL_NAMES)}")
    parser.add_argument("--search", type=str, default="off", choices=["off", "auto", "force"],
                        help="web_search without being asked: auto (when the question needs it), force (always)")
    parser.add_argument("--search-docs", type=str, default=None,
                        help=f"folder web_search searches offline (default ${SEARCH_DOCS_ENV}; ${SEARCH_URL_ENV} "
                             f"selects an HTTP search API instead)")
    return parser


class TokenPrinter:
    """Writes generated tokens to `out` as they stream (nanochat.text_stream.TokenTextStream decides the text)."""

    def __init__(self, tokenizer, out):
        self.stream, self.out = TokenTextStream(tokenizer), out

    def feed(self, token):
        self.out.write(self.stream.feed(token))
        self.out.flush()

    def close(self):
        self.out.write(self.stream.close())
        self.out.flush()


def tokens_to_parts(tokenizer, tokens):
    """Generated assistant tokens -> message content: a string, or a list of text/python/python_output parts
    when it used a tool (so the history re-renders exactly as it was generated)."""
    return assistant_content(assistant_parts_from_tokens(tokenizer, tokens))


def answer(engine, tokenizer, messages, args, seed, out):
    """Generate and stream the assistant's reply to `messages` (ending with a user message); returns
    (assistant content, number of exchanges dropped to fit the context)."""
    seq_len = engine.model.config.sequence_len
    # room for the answer: the requested max, but never more than half the context (a long history still fits)
    max_new = max(1, min(args.max_tokens, seq_len // 2)) + len(engine.think_prefill_tokens(args.think))
    prompt, kept = fit_conversation_to_context(tokenizer, messages, seq_len, max_new_tokens=max_new)
    dropped = (len(messages) - len(kept)) // 2
    printer = TokenPrinter(tokenizer, out)
    generated = []
    top_k = args.top_k if args.top_k > 0 else None
    max_tokens = min(args.max_tokens, seq_len - len(prompt))
    for token_column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                           temperature=args.temperature, top_k=top_k, seed=seed,
                                           think=args.think, search=args.search):
        generated.append(token_column[0])
        printer.feed(token_column[0])
    printer.close()
    return tokens_to_parts(tokenizer, generated), dropped, kept


def switch_think(command, current):
    """'/think' flips on <-> off; '/think on|off|default' sets it (default: None, the model's own)."""
    words = command.lower().split()
    if len(words) == 1:
        return "off" if current == "on" else "on"
    return None if words[1] == "default" else words[1] if words[1] in THINK_MODES else current


def main(argv=None, input_fn=input, out=None):
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    logging.getLogger("nanochat").setLevel(logging.WARNING)  # no loading chatter between you and the model
    device_type = args.device_type or autodetect_device_type()
    if args.quantize and device_type != "cpu":
        raise SystemExit(f"--quantize {args.quantize} speeds up CPU decoding only; drop it on {device_type}")
    tools = [name.strip() for name in args.tools.split(",") if name.strip()]
    if not set(tools) <= set(TOOL_NAMES):
        print(f"--tools: unknown tool in {args.tools!r}; choose from {','.join(TOOL_NAMES)}", file=sys.stderr)
        raise SystemExit(2)
    provider = provider_from_env(args.search_docs) if "web_search" in tools or args.search != "off" else None
    if provider is None and ("web_search" in tools or args.search != "off"):
        print(f"web_search needs something to search: --search-docs FOLDER, ${SEARCH_DOCS_ENV} or ${SEARCH_URL_ENV}",
              file=sys.stderr)
        raise SystemExit(2)
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer, quantize=args.quantize, tools=tools or None, search_provider=provider,
                    think_default=model_think_default(meta))

    if not args.prompt:
        print("\nNanoChat Interactive Mode", file=out)
        print("-" * 50, file=out)
        print("Type 'quit' or 'exit' to end the conversation", file=out)
        print("Type 'clear' to start a new conversation", file=out)
        print("-" * 50, file=out)

    messages = []
    seed = args.seed
    while True:
        if args.prompt:
            user_input = args.prompt
        else:
            try:
                user_input = input_fn("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print("\nGoodbye!", file=out)
                break
        if user_input.lower() in ("quit", "exit"):
            print("Goodbye!", file=out)
            break
        if user_input.lower() == "clear":
            messages = []
            print("Conversation cleared.", file=out)
            continue
        if not user_input:
            continue
        if user_input.split()[0].lower() == "/think":
            args.think = switch_think(user_input, args.think or engine.think_default)
            print(f"Think mode: {args.think or 'the model default (nothing prefilled)'}", file=out)
            continue

        messages.append({"role": "user", "content": user_input})
        print("\nAssistant: ", end="", file=out, flush=True)
        try:
            with torch.inference_mode():
                content, dropped, kept = answer(engine, tokenizer, messages, args, seed, out)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the chat. The exchange is dropped rather than kept half-done: the cut
            # answer would be rendered as a finished turn the model then imitates, and a question without its
            # answer would break the user/assistant alternation the chat format needs.
            messages.pop()
            seed += 1
            print("\n(stopped: this question and its partial answer are left out of the conversation)", file=out)
            if args.prompt:
                break
            continue
        print(file=out)
        visible = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        if split_reasoning(visible)[1] is None:
            print(f"(no answer: the reasoning was still going after {args.max_tokens} tokens; raise --max-tokens "
                  f"or '/think off')", file=out)
        if dropped:
            print(f"(context full: the {dropped} oldest exchange(s) no longer fit and were dropped)", file=out)
        # keep only what the model can still see, so the history never grows without bound
        messages = list(kept) + [{"role": "assistant", "content": content}]
        seed += 1
        if args.prompt:
            break


if __name__ == "__main__":
    main()
