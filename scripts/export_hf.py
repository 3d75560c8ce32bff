"""
Export a checkpoint as a Hugging Face folder that `transformers` loads with our logits (and optionally push it).

    python -m scripts.export_hf --source sft --out exports/d20-sft
    python -m scripts.export_hf --source base --model-tag d12 --step 2000 --out exports/d12 \
        --push-to hf://me/nanochat-d12

Then, anywhere:
    AutoTokenizer.from_pretrained(DIR); AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
and nanochat reads it back: `python -m scripts.chat_cli -i DIR` (or -i me/nanochat-d12).

--format auto picks transformers' native `nanochat` type when the checkpoint fits it exactly (see
nanochat/hf/native.py), otherwise ships our modeling code; --format native refuses, listing what does not map.
"""

import argparse
import os
import sys
import time

from nanochat.checkpoint_manager import CHECKPOINT_DIRS, load_model
from nanochat.common import get_base_dir
from nanochat.hf import native
from nanochat.hf.export import DTYPES, export_model, hub_repo_id, push_folder
from nanochat.report import Report

# report summary column of each checkpoint source
REPORT_STAGES = {"base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL", "dpo": "DPO"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face folder (safetensors, config, "
                                                 "tokenizer, chat template, model card)")
    parser.add_argument("-i", "--source", default="sft", choices=list(CHECKPOINT_DIRS),
                        help="which checkpoints: base|mid|sft|rl|dpo (default sft)")
    parser.add_argument("--model-tag", default=None, help="model tag, e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="step to export (default: the last)")
    parser.add_argument("--out", required=True, help="folder to write (must be empty or absent unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    parser.add_argument("--format", default="auto", choices=["auto", "native", "ours"],
                        help="auto: transformers' native nanochat type when the model fits it exactly, else ours; "
                             "native: refuse unless it fits; ours: always ship our modeling code (trust_remote_code)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="weight dtype in the folder (default float32: exact; bfloat16 halves the size)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file before the weights are split into shards (default 5GB)")
    parser.add_argument("--license", default="mit", help="license in the model card (default mit)")
    parser.add_argument("--base-model", default=None, help="hub id of the model this one was fine-tuned from (card)")
    parser.add_argument("--push-to", default=None,
                        help="after writing, upload to hf://<org>/<name> (honours HF_ENDPOINT and HF_TOKEN)")
    return parser.parse_args(argv)


def report_metrics(source):
    report_dir = os.path.join(get_base_dir(), "report")
    if not os.path.isdir(report_dir):
        return {}
    return Report(report_dir).stage_metrics(REPORT_STAGES[source])


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    try:
        repo_id = hub_repo_id(args.push_to) if args.push_to else None  # a typo fails now, not after the export
        model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step)
        problems = native.native_mismatches(model)
        if args.format == "auto" and problems:
            print("Shipping our modeling code (trust_remote_code): the native nanochat type lacks "
                  + "; ".join(p.split(" (")[0] for p in problems))
        metrics = report_metrics(args.source)
        print(f"Writing {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}) ...")
        fmt = export_model(model, tokenizer, meta, args.out, args.source, fmt=args.format, dtype_name=args.dtype,
                           max_shard_size=args.max_shard_size, license=args.license, base_model=args.base_model,
                           metrics=metrics, repo_id=repo_id, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # UnmappableError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind = "transformers' native nanochat type" if fmt == "native" else "our modeling code"
    print(f"Exported {args.source} step {meta.get('step')} as {kind} to {args.out} in {time.time() - t0:.1f}s")
    if repo_id:
        push_folder(args.out, repo_id)
        print(f"Pushed to {repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
