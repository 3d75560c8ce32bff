"""
Benchmark the inference Engine: prefill and decode throughput, memory-bandwidth utilization (MBU) of decode,
peak memory. Prints ONE JSON line last.

Random model of a given shape (sized like base_train: dim = depth*aspect_ratio rounded up to head_dim):
    python -m dev.bench_engine --depth 4 --max-seq-len 256 --vocab-size 8192
    python -m dev.bench_engine --depth 6 --head-dim 64 --max-seq-len 512 --vocab-size 8192
A checkpoint:
    python -m dev.bench_engine -i sft -g d6

Decode runs sample with temperature 1.0 / top-k 50 and no tools, on random prompt ids, and never stop early
(the benchmark's tokenizer puts the special tokens outside the vocabulary), so every run decodes the same
number of tokens; throughput still counts the tokens actually produced. Each measurement is repeated (--repeats) and
the median and best are reported: on a shared machine the best is the less noisy estimate of the cost.

MBU (decode is memory-bound): the bytes one decode step must move at least (`decode_bytes_per_step`: every weight
once as stored, only the looked-up rows of the embedding tables, each layer's KV cache up to its window at the run's
mean context, the new token's K/V) per best step time, over the GPU's peak memory bandwidth (nanochat.common's
table; 0 on a CPU or an unknown GPU, where decode_gb_per_s_b<N> still gives the achieved rate).
"""

import argparse
import json
import os
import statistics
import time

import torch

from nanochat.common import COMPUTE_DTYPE, autodetect_device_type, compute_init, get_peak_bandwidth, print0
from nanochat.engine import Engine, KVCache
from nanochat.scaling import build_meta_model, model_config_for_depth
from nanochat.training import peak_memory_mib

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class SpecialsOnlyTokenizer:
    """What the Engine needs from a tokenizer when tools are off: the special ids. They are placed past the
    vocabulary so a random model never samples <|assistant_end|>: every decode run has the same length."""

    def __init__(self, vocab_size):
        self.ids = {name: vocab_size + i for i, name in enumerate(SPECIALS)}

    def encode_special(self, name):
        return self.ids[name]

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]


def build_random_model(args, device):
    model = build_meta_model(model_config_for_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len,
                                                    args.vocab_size, args.window_pattern))
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    return model, f"random d{args.depth}"


def decode_bytes_per_step(model, batch, context_len):
    """Bytes a decode step of `batch` rows at `context_len` tokens of context moves at the least (see the module
    docstring); what MBU divides by the step time."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    weights = sum(batch * p.shape[1] * p.element_size() if id(p) in tables else p.numel() * p.element_size()
                  for p in model.parameters())
    config = model.config
    kv_per_token = 2 * config.n_kv_head * (config.n_embd // config.n_head) * COMPUTE_DTYPE.itemsize  # K and V
    kv = batch * kv_per_token * sum(min(context_len, window) + 1 for window in model.window_sizes)
    return weights + kv


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_prefill(engine, prompt, device, repeats):
    """Seconds per prefill of the prompt into a fresh cache, as Engine.generate does it (last position's logits)."""
    prefill, _ = engine.step_fns()
    times = []
    for _ in range(repeats):
        cache = KVCache.for_model(engine.model, 1, len(prompt), device=device)
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            prefill(ids, kv_cache=cache)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_decode(engine, prompt, num_samples, max_tokens, device, repeats):
    """Seconds per decode step and tokens per second (prefill excluded: the clock starts at the first token)."""
    step_times, rates = [], []
    for r in range(repeats):
        steps, produced = 0, 0
        t_first = None
        sync(device)
        for columns, _ in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens, temperature=1.0,
                                          top_k=50, seed=r):
            if t_first is None:
                t_first = time.perf_counter()  # first column comes straight from the prefill's logits
            steps += 1
            produced += len(columns)
        sync(device)
        elapsed = time.perf_counter() - t_first
        if steps > 1:
            step_times.append(elapsed / (steps - 1))
            rates.append((produced - num_samples) / elapsed)
    return step_times, rates


def main(argv=None):
    parser = argparse.ArgumentParser(description="Engine prefill/decode throughput; prints one JSON line")
    parser.add_argument("-i", "--source", default=None, help="load a checkpoint: base|sft|rl|dpo (default: random model)")
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint model tag (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--depth", type=int, default=4, help="random model: number of layers")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="random model: model_dim = depth * aspect_ratio")
    parser.add_argument("--head-dim", type=int, default=128, help="random model: attention head dimension")
    parser.add_argument("--max-seq-len", type=int, default=256, help="random model: context length")
    parser.add_argument("--vocab-size", type=int, default=8192, help="random model: vocabulary size")
    parser.add_argument("--window-pattern", default="L", help="random model: sliding-window pattern (L = full)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding")
    parser.add_argument("--num-tokens", type=int, default=256, help="new tokens per decode run (capped to the context)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated num_samples to time decode at")
    parser.add_argument("--prefill-len", type=int, default=0, help="prompt length for the prefill timing (0: context - 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median and best reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="CPU decode with int8 weights (faster, slightly lossy; default: exact)")
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="Engine(decode_threads=...): threads during CPU decode steps (0: same as --threads)")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    if args.source:
        from nanochat.checkpoint_manager import load_model
        model, _, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        name = f"{args.source} {args.model_tag or ''} {args.step or ''}".strip()
    else:
        model, name = build_random_model(args, device)
    config = model.config
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(0)
    random_ids = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
    engine = Engine(model, SpecialsOnlyTokenizer(vocab), tools=None, decode_threads=args.decode_threads or None,
                    quantize=args.quantize)
    prompt = random_ids(args.prompt_len)
    max_tokens = engine.max_new_tokens(len(prompt), args.num_tokens)

    # warm up (first calls allocate, pick kernels, ...)
    for _ in engine.generate(prompt, num_samples=2, max_tokens=8):
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    prefill_len = args.prefill_len or config.sequence_len - 1
    print0(f"timing prefill of {prefill_len} tokens")
    prefill_times = time_prefill(engine, random_ids(prefill_len), device, args.repeats)
    result = {
        "model": name, "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
        "sequence_len": config.sequence_len, "vocab_size": vocab,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "device": str(device), "dtype": str(COMPUTE_DTYPE).replace("torch.", ""), "threads": torch.get_num_threads(),
        "decode_threads": args.decode_threads or torch.get_num_threads(), "quantize": args.quantize,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "prefill_len": prefill_len, "prefill_tok_per_s": round(prefill_len / min(prefill_times), 1),
        "prompt_len": len(prompt), "new_tokens": max_tokens,
    }
    peak_bandwidth = get_peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0
    mean_context = len(prompt) + max_tokens / 2
    for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
        print0(f"timing decode: batch {batch}, {max_tokens} tokens, {args.repeats} runs")
        step_times, rates = time_decode(engine, prompt, batch, max_tokens, device, args.repeats)
        result[f"decode_tok_per_s_b{batch}"] = round(max(rates), 1)
        result[f"decode_tok_per_s_b{batch}_median"] = round(statistics.median(rates), 1)
        result[f"decode_ms_per_step_b{batch}"] = round(1000 * min(step_times), 3)
        bytes_per_step = decode_bytes_per_step(model, batch, mean_context)
        result[f"decode_gb_per_s_b{batch}"] = round(bytes_per_step / min(step_times) / 1e9, 2)
        mbu = 100 * bytes_per_step / min(step_times) / peak_bandwidth if peak_bandwidth else 0.0
        result[f"mbu_b{batch}"] = round(mbu, 2)
    result["peak_mem_mb"] = round(peak_memory_mib(device.type), 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
