"""
Developer check: does our GPT reproduce a real nanochat checkpoint's logits?

The directory holds what nanochat wrote (base_checkpoints/<tag>/model_<step>.pt + meta_<step>.json) and
reference_logits.pt = {"ids": [...], "logits": FloatTensor[1, T, V]} computed by nanochat on CPU in fp32.
We rebuild GPTConfig from meta's model_config, load the state dict strictly, run the ids and print the
max abs difference (expect ~1e-5). Run with NANOCHAT_DTYPE=float32:

    NANOCHAT_DTYPE=float32 python -m dev.check_nanochat_fixture --ckpt-dir /tmp/nanochat_ckpt
"""

import argparse
import glob
import json
import os

import torch

from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPT, GPTConfig


def main():
    parser = argparse.ArgumentParser(description="Compare our GPT's logits with a nanochat checkpoint's reference logits")
    parser.add_argument("--ckpt-dir", required=True, help="folder with base_checkpoints/<tag>/model_*.pt and reference_logits.pt")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference that counts as a match")
    args = parser.parse_args()

    if COMPUTE_DTYPE != torch.float32:
        raise SystemExit("Reference logits were computed in fp32: rerun with NANOCHAT_DTYPE=float32")
    model_files = sorted(glob.glob(os.path.join(args.ckpt_dir, "base_checkpoints", "*", "model_*.pt")))
    if not model_files:
        raise SystemExit(f"No base_checkpoints/*/model_*.pt under {args.ckpt_dir}")
    model_path = model_files[-1]
    step_name = os.path.basename(model_path).removeprefix("model_").removesuffix(".pt")
    meta_path = os.path.join(os.path.dirname(model_path), f"meta_{step_name}.json")
    with open(meta_path) as f:
        meta = json.load(f)
    config = GPTConfig(**meta["model_config"])
    print(f"checkpoint: {model_path}\nconfig: {config}")

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()  # rotary buffers; every parameter is then overwritten by the checkpoint
    state_dict = torch.load(model_path, map_location="cpu")
    state_dict = {k.removeprefix("_orig_mod."): v.float() for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()

    ref = torch.load(os.path.join(args.ckpt_dir, "reference_logits.pt"), map_location="cpu")
    ids = torch.tensor([ref["ids"]], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids)
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"tokens: {ids.size(1)}  logits: {tuple(logits.shape)}  max abs diff: {diff:.3e}  "
          f"(reference logit scale: {ref['logits'].abs().max().item():.3f})")
    print("MATCH" if diff <= args.tolerance else "MISMATCH")
    print(json.dumps({"max_abs_diff": diff, "match": diff <= args.tolerance}))


if __name__ == "__main__":
    main()
