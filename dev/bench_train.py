"""
Training throughput benchmark: the real model, optimizer and step of base_train on random tokens (no tokenizer
or data needed). Prints progress, then ONE JSON line as the last stdout line:
tok/s, ms/step, MFU, peak memory, the shape and the settings used.

    python -m dev.bench_train --depth=6 --head-dim=64 --window-pattern=L --max-seq-len=512 \
        --device-batch-size=32 --total-batch-size=16384 --vocab-size=8192        # runcpu.sh's shape
    python -m dev.bench_train --depth=12 --compile=1                          # a GPU
    python -m dev.bench_train --depth=20 --max-seq-len=2048 --device-batch-size=32 --total-batch-size=65536 --fp8

MFU: on CUDA against the GPU's peak bf16 FLOP/s (nanochat's convention). On CPU there is no datasheet peak, so
"mfu" is 0 and "mfu_cpu_matmul" compares against a large fp32/compute-dtype matmul measured on this machine
right before the run (an honest achievable peak, not a theoretical one).
"""

import sys
import json
import time
import argparse

import torch

from nanochat import chunked_loss
from nanochat.common import compute_init, compute_cleanup, print0, autodetect_device_type, get_peak_flops, COMPUTE_DTYPE
from nanochat.fp8 import enable_fp8_training
from nanochat.scaling import model_config_for_depth, build_meta_model
from nanochat.synthetic_data import synthetic_loader
from nanochat.training import compute_grad_accum_steps, peak_memory_mib, should_compile


def measure_matmul_flops(device, dtype, n=1024, seconds=1.0):
    """Achieved FLOP/s of an n x n matmul on this device (a practical peak for CPU MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    iters, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.time() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark base_train's training step on random tokens (one JSON line)")
    parser.add_argument("--depth", type=int, default=4, help="transformer layers")
    parser.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to --head-dim)")
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    parser.add_argument("--max-seq-len", type=int, default=256, help="context length")
    parser.add_argument("--window-pattern", type=str, default="L", help="S/L attention window pattern")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size of the random tokens / model")
    parser.add_argument("--device-batch-size", type=int, default=8, help="sequences per micro-step")
    parser.add_argument("--total-batch-size", type=int, default=2048, help="tokens per optimizer step")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (compilation, allocator, caches)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1 / 0 / -1 = auto (as base_train: CUDA, or CPU with a C++ compiler)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave torch's default)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--fp8", action="store_true",
                        help="FP8 matmuls as base_train --fp8 (CUDA H100+; ignored elsewhere)")
    parser.add_argument("--fp8-recipe", type=str, default="tensorwise", choices=["rowwise", "tensorwise"],
                        help="FP8 scaling recipe, as base_train")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    config = model_config_for_depth(args.depth, args.aspect_ratio, args.head_dim, args.max_seq_len, args.vocab_size,
                                    args.window_pattern)
    model = build_meta_model(config)
    model.to_empty(device=device)
    model.init_weights()
    flops_per_token = model.estimate_flops()
    num_params = model.num_params_by_group()["total"]
    if args.fp8:
        enable_fp8_training(model, args.fp8_recipe, device_type)
    fp8 = any("Float8" in type(m).__name__ for m in model.modules())
    optimizer = model.setup_optimizer()
    use_compile = should_compile(args.compile, device_type)
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    chunked_loss.COMPILE_ELEMENTWISE = use_compile  # as base_train
    grad_accum = compute_grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
    loader = synthetic_loader(args.vocab_size, args.device_batch_size, args.max_seq_len, device, rank, world_size)
    print0(f"config: {config} | params: {num_params:,} | FLOPs/token: {flops_per_token:.3e} | grad accum: {grad_accum} | "
           f"compile: {use_compile} | threads: {torch.get_num_threads()} | dtype: {COMPUTE_DTYPE}")

    step_times, opt_times = [], []
    for step in range(args.warmup_steps + args.steps):
        sync()
        t0 = time.time()
        for _ in range(grad_accum):
            x, y, _ = next(loader)
            loss = train_model(x, y)
            (loss / grad_accum).backward()
        sync()
        t_opt = time.time()
        optimizer.step()
        train_model.zero_grad(set_to_none=True)
        loss.item()
        sync()
        dt = time.time() - t0
        dt_opt = time.time() - t_opt
        timed = step >= args.warmup_steps
        if timed:
            step_times.append(dt)
            opt_times.append(dt_opt)
        print0(f"step {step} ({'timed' if timed else 'warmup'}): {dt * 1000:.1f} ms (optimizer {dt_opt * 1000:.1f} ms) | loss {loss.item():.4f}")

    step_times.sort()
    ms_per_step = 1000 * sum(step_times) / len(step_times)
    tok_per_sec = args.total_batch_size / (ms_per_step / 1000)
    achieved = flops_per_token * tok_per_sec
    result = {
        "tok_per_sec": round(tok_per_sec, 1),
        "ms_per_step": round(ms_per_step, 2),
        "ms_per_step_median": round(1000 * step_times[len(step_times) // 2], 2),
        "tok_per_sec_best": round(args.total_batch_size / step_times[0], 1),  # fastest step: least disturbed
        "ms_optimizer": round(1000 * sum(opt_times) / len(opt_times), 2),  # part of ms_per_step
        "achieved_tflops": round(achieved / 1e12, 4),
        "peak_mem_mib": round(peak_memory_mib(device_type), 1),
        "device": torch.cuda.get_device_name(0) if device_type == "cuda" else device_type,
        "dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
        "compile": use_compile, "fp8": fp8, "threads": torch.get_num_threads(), "world_size": world_size,
        "depth": args.depth, "n_embd": config.n_embd, "head_dim": args.head_dim, "max_seq_len": args.max_seq_len,
        "window_pattern": args.window_pattern, "vocab_size": args.vocab_size, "device_batch_size": args.device_batch_size,
        "total_batch_size": args.total_batch_size, "grad_accum_steps": grad_accum, "num_params": num_params,
        "flops_per_token": flops_per_token, "steps": args.steps, "warmup_steps": args.warmup_steps,
    }
    if device_type == "cuda":
        peak = get_peak_flops(torch.cuda.get_device_name(0))
        result["mfu"] = round(100 * achieved / (peak * world_size), 2) if peak else 0.0
    else:
        matmul_flops = measure_matmul_flops(device, COMPUTE_DTYPE)
        result["mfu"] = 0.0
        result["cpu_matmul_gflops"] = round(matmul_flops / 1e9, 1)
        result["mfu_cpu_matmul"] = round(100 * achieved / matmul_flops, 2)
    compute_cleanup()
    if rank == 0:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
