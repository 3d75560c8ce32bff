"""
Read a Hugging Face folder (ours or transformers' native `nanochat` type) or a hub repo back into what
checkpoint_manager builds a GPT from: a state dict, a meta dict with model_config, and the tokenizer.

The tokenizer comes from the folder's tokenizer.json (vocab ids are the tiktoken ranks), never from a pickle:
unpickling a downloaded file would run whatever code it holds.
"""

import json
import os
import re
from dataclasses import fields

import huggingface_hub
from safetensors.torch import load_file

from nanochat.download import hf_endpoint
from nanochat.gpt import GPTConfig, SOFTCAP
from nanochat.hf import ARCHITECTURE, META_FILENAME, MODEL_TYPE, is_exported_folder, native
from nanochat.hf.tokenizer import encoding_from_tokenizer_json
from nanochat.tokenizer import RustBPETokenizer

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "*.py", "README.md"]


def resolve_folder(source):
    """A local exported folder as is; a hub repo id (org/name or hf://org/name) downloaded into the hub cache."""
    if os.path.isdir(source):
        if not is_exported_folder(source):
            raise FileNotFoundError(f"{source} has no config.json: not an exported Hugging Face folder "
                                    f"(make one with `python -m scripts.export_hf`)")
        return source
    repo_id = source.removeprefix("hf://")
    if not REPO_ID.fullmatch(repo_id):
        raise ValueError(f"Unknown checkpoint source {source!r}: expected base|mid|sft|rl|dpo, an exported folder, "
                         f"or a hub repo id like org/name")
    try:
        return huggingface_hub.snapshot_download(repo_id, endpoint=hf_endpoint(), allow_patterns=HUB_FILES)
    except Exception as e:
        raise RuntimeError(f"Could not download {repo_id} from {hf_endpoint()}: {type(e).__name__}: {e}. Check the "
                           f"name, HF_ENDPOINT and HF_TOKEN (gated or private repos), or pass a local folder.") from e


def read_folder_meta(folder):
    """The folder's meta (nanochat_meta.json when there is one) and config.json as hf_config, without reading the
    weights: what a trainer inherits its settings from."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    meta = {}
    if os.path.exists(os.path.join(folder, META_FILENAME)):
        with open(os.path.join(folder, META_FILENAME), encoding="utf-8") as f:
            meta = json.load(f)
    return {**meta, "hf_config": config, "hf_folder": folder}


def read_folder_tokenizer(folder):
    return RustBPETokenizer(encoding_from_tokenizer_json(os.path.join(folder, "tokenizer.json")), "<|bos|>")


def read_folder(folder):
    """(state dict in our names, meta with model_config and the folder's config as hf_config, tokenizer)."""
    meta = read_folder_meta(folder)
    config = meta["hf_config"]
    state = _read_weights(folder)
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        known = {f.name for f in fields(GPTConfig)}
        model_config = {k: v for k, v in config.items() if k in known}
    elif model_type == native.MODEL_TYPE:
        model_config, state = native.from_native(config, state)
    else:
        raise native.UnmappableError(f"{folder} is not a nanochat model", [
            f"model_type {model_type!r} (expected {MODEL_TYPE!r} or {native.MODEL_TYPE!r})"])
    meta["model_config"] = model_config
    return state, meta, read_folder_tokenizer(folder)


def _read_weights(folder):
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(folder, shard)))
    return state


def check_built_model(model, hf_config):
    """Refuse a model whose GPT would compute something else than the folder describes (listing the differences):
    the native type has no QK scale, and our config records the layout the exporting GPT derived."""
    if hf_config.get("model_type") == native.MODEL_TYPE:
        problems = native.native_mismatches(model)
        if problems:
            raise native.UnmappableError("This GPT cannot compute what the native nanochat folder holds", problems)
        return
    ours = {"padded_vocab_size": model.padded_vocab_size, "window_sizes": list(model.window_sizes),
            "value_embed_layers": sorted(int(i) for i in model.value_embeds), "backout_layer": model.backout_layer,
            "qk_scale": native.qk_scale(model), "logit_softcap": SOFTCAP, "architectures": [ARCHITECTURE]}
    problems = [f"{key} = {hf_config.get(key)!r} in config.json, this GPT: {value!r}"
                for key, value in ours.items() if hf_config.get(key) != value]
    if problems:
        raise native.UnmappableError("This GPT would compute something else than the exported model", problems)
