"""
Developer check: on a checkpoint, the Engine's greedy generation (KV cache, CPU decoder) equals the model's naive
full-recompute generate() token for token, and how much faster it is.

    python -m dev.check_engine -i sft --max-tokens 64
"""

import argparse
import time

from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_init
from nanochat.engine import Engine


def main():
    parser = argparse.ArgumentParser(description="Check that Engine.generate matches GPT.generate (greedy) on a checkpoint")
    parser.add_argument("-i", "--source", default="base", help="checkpoint source: base|sft|rl|dpo")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last)")
    parser.add_argument("--prompt", default="The chemical formula of water is", help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args()
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    prompt = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    max_tokens = Engine(model, tokenizer).max_new_tokens(len(prompt), args.max_tokens)

    t0 = time.perf_counter()
    reference = list(model.generate(prompt, max_tokens, temperature=0.0))
    t1 = time.perf_counter()
    engine_ids = [column[0] for column, _ in Engine(model, tokenizer, tools=None).generate(prompt, max_tokens=max_tokens, temperature=0.0)]
    t2 = time.perf_counter()
    print(tokenizer.decode(prompt + engine_ids))
    print(f"naive generate: {t1 - t0:.2f}s, engine: {t2 - t1:.2f}s")
    mismatch = next((i for i, (a, b) in enumerate(zip(reference, engine_ids)) if a != b), None)
    if mismatch is None and len(reference) == len(engine_ids):
        print("Match: True")
    else:
        print(f"Match: False (first difference at generated token {mismatch})")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
