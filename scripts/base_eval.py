"""
Evaluate a base model: bits per byte on the train and val splits, the CORE metric (DCLM's 22 in-context tasks),
and a few samples to look at.

    python -m scripts.base_eval                                   # largest base model, last step, everything
    python -m scripts.base_eval --model-tag d12 --eval bpb,sample --split-tokens 524288
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --device-batch-size=16

CORE writes $NANOCHAT_BASE_DIR/base_eval/base_model_<step:06d>.csv (Task, Accuracy, Centered rows + CORE).
"""

import os
import sys
import argparse

from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init, compute_cleanup, print0, get_base_dir, autodetect_device_type, warn_if_cpu_is_busy
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.fileio import atomic_open
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.samples import SAMPLE_PROMPTS, greedy_samples, unconditional_samples
from nanochat.tokenizer import get_token_bytes


def write_core_csv(path, core_results):
    """nanochat's CSV: `Task, Accuracy, Centered` rows, then the CORE row."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path, "w") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in core_results["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {core_results['centered_results'][label]:<10.6f}\n")
        f.write(f"{'CORE':<35}, {'':<10}, {core_results['core_metric']:<10.6f}\n")


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate a base model: CORE, train/val bits per byte, samples")
    parser.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    parser.add_argument("--model-tag", type=str, default=None, help="checkpoint tag under base_checkpoints (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="max examples per CORE task (-1 = all)")
    parser.add_argument("--core-plain", action="store_true",
                        help="score CORE the reference's way: a full-logits forward of every option, no shared "
                             "prefix (same decisions up to float rounding, several times slower; for checking)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per bpb batch")
    parser.add_argument("--split-tokens", type=int, default=40 * 524288,
                        help="tokens per split for bpb (rounded down to a multiple of batch x seq len x ranks)")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--data-dir", type=str, default=None, help="data folder for bpb (default: the pretraining data)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    modes = [m.strip() for m in args.eval.split(",") if m.strip()]
    bad = sorted(set(modes) - {"core", "bpb", "sample"})
    if bad or not modes:
        parser.error(f"--eval takes a comma-separated subset of core,bpb,sample; got {args.eval!r}")

    device_type = autodetect_device_type() if args.device_type == "" else args.device_type
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    if device_type == "cpu":
        warn_if_cpu_is_busy("evaluation")
    try:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
        step = meta["step"]
        model_name = f"base_model (step {step})"
        slug = f"base_model_{step:06d}"
        out = {"model": model_name}
        report_data = [{"Model": model_name}]

        if "core" in modes:
            core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, plain=args.core_plain)
            out["core"] = core
            print0(f"CORE metric: {core['core_metric']:.4f}")
            if rank == 0:
                csv_path = os.path.join(get_base_dir(), "base_eval", f"{slug}.csv")
                write_core_csv(csv_path, core)
                print0("=" * 80 + f"\nModel: {model_name}\n" + "=" * 80)
                with open(csv_path, encoding="utf-8") as f:
                    print0(f.read())
                out["csv_path"] = csv_path
            report_data[0]["CORE metric"] = core["core_metric"]
            report_data.append(core["centered_results"])

        if "bpb" in modes:
            T = meta["model_config"]["sequence_len"]
            tokens_per_step = args.device_batch_size * T * world_size
            split_tokens = args.split_tokens // tokens_per_step * tokens_per_step
            if split_tokens == 0:
                raise SystemExit(f"--split-tokens {args.split_tokens:,} is less than one batch ({args.device_batch_size} x "
                                 f"{T} x {world_size} rank(s) = {tokens_per_step:,} tokens): raise it or lower --device-batch-size")
            if split_tokens != args.split_tokens:
                print0(f"Adjusted --split-tokens to {split_tokens:,} (a multiple of {tokens_per_step:,})")
            steps = split_tokens // tokens_per_step
            token_bytes = get_token_bytes(device=device)
            for split in ("train", "val"):
                loader = tokenizing_distributed_data_loader_bos_bestfit(
                    tokenizer, args.device_batch_size, T, split, device=device, data_dir=args.data_dir)
                bpb = evaluate_bpb(model, loader, steps, token_bytes)
                out[f"{split}_bpb"] = bpb
                report_data[0][f"{split} bpb"] = bpb
                print0(f"{split} bpb: {bpb:.6f}")

        if "sample" in modes and rank == 0:
            print0("\nGreedy completions:")
            completions = greedy_samples(model, tokenizer, SAMPLE_PROMPTS, max_tokens=16)
            for text in completions:
                print0(text)
            print0("\nUnconditional samples (temperature 1.0):")
            samples = unconditional_samples(model, tokenizer, num_samples=8, max_tokens=128)
            for text in samples:
                print0("-" * 80 + "\n" + text)
            out["samples"], out["unconditional"] = completions, samples
            report_data.append("Samples:\n" + "\n".join(f"- `{t!r}`" for t in completions))

        get_report().log(section="Base model evaluation", data=report_data)
        return out
    finally:
        compute_cleanup()


if __name__ == "__main__":
    main()
