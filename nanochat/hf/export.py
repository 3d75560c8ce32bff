"""
Write a model as a Hugging Face folder (and push it to the hub).

    model.safetensors                  weights (model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                       when over --max-shard-size, split by huggingface_hub like transformers does)
    config.json, generation_config.json
    tokenizer.json, tokenizer_config.json (chat template inside)
    README.md                          model card (front matter: license, library_name, pipeline_tag, base_model,
                                       model-index with the report's metrics)
    nanochat_meta.json                 where it came from (source, step, user_config) for nanochat's own tools
    configuration_nanochat_gpt.py, modeling_nanochat_gpt.py   only when our modeling code is shipped

The format is transformers' native `nanochat` type when the model fits it exactly (nanochat/hf/native.py says
what that means), otherwise our modeling code, copied verbatim from this package and registered with auto_map.
The folder is assembled beside the destination and renamed into place, so a failed export leaves nothing half
written.
"""

import dataclasses
import json
import os
import shutil

import huggingface_hub
import torch
from huggingface_hub import ModelCard, ModelCardData, EvalResult, split_torch_state_dict_into_shards
from safetensors.torch import save_file

from nanochat.download import hf_endpoint
from nanochat.fileio import atomic_write_text, temp_path_for
from nanochat.gpt import SOFTCAP
from nanochat.hf import ARCHITECTURE, META_FILENAME, MODEL_TYPE, native
from nanochat.hf.tokenizer import hf_tokenizer, tokenizer_config

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE_FILES = ("configuration_nanochat_gpt.py", "modeling_nanochat_gpt.py")
# the report's summary rows that are not accuracies (model-index metric types)
METRIC_TYPES = {"val bpb": "bpb", "CORE": "core", "ChatCORE": "chatcore"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ours_config(model, bos_token_id, eos_token_id, dtype_name):
    """config.json for our modeling code: GPTConfig verbatim plus the layout the GPT derived from it."""
    config = model.config
    ve_gates = [block.attn.ve_gate for block in model.transformer.h if block.attn.ve_gate is not None]
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": "configuration_nanochat_gpt.NanochatGPTConfig",
                     "AutoModelForCausalLM": "modeling_nanochat_gpt.NanochatGPTForCausalLM"},
        **dataclasses.asdict(config),
        "padded_vocab_size": model.padded_vocab_size,
        "window_sizes": list(model.window_sizes),
        "value_embed_layers": sorted(int(i) for i in model.value_embeds),
        "backout_layer": model.backout_layer,
        "qk_scale": native.qk_scale(model),
        "logit_softcap": SOFTCAP,
        "smear_gate_channels": model.smear_gate.in_features,
        "ve_gate_channels": ve_gates[0].in_features if ve_gates else 12,
        "tie_word_embeddings": False,
        "use_cache": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": dtype_name,
    }


def choose_format(model, requested):
    """'native' or 'ours'. auto: native exactly when the model fits it. native: refuses, listing what does not map."""
    problems = native.native_mismatches(model)
    if requested == "native" and problems:
        raise native.UnmappableError("This checkpoint does not fit transformers' native nanochat type "
                                     "(use --format auto or ours to ship our modeling code instead)", problems)
    if requested == "auto":
        return "ours" if problems else "native"
    return requested


def save_weights(state_dict, folder, max_shard_size):
    """model.safetensors, or shards + model.safetensors.index.json (huggingface_hub decides the split)."""
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name] for name in names}, os.path.join(folder, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        _write_json(os.path.join(folder, "model.safetensors.index.json"), index)
    return split.is_sharded


def export_model(model, tokenizer, meta, out_dir, source, fmt="auto", dtype_name="float32", max_shard_size="5GB",
                 license="mit", base_model=None, metrics=None, repo_id=None, overwrite=False):
    """Write the folder; returns the format used ('native' or 'ours'). metrics: {name: value} for the card;
    repo_id: where it will be pushed (the card's examples load from there)."""
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty: choose another --out or pass --overwrite")
    fmt = choose_format(model, fmt)
    enc = tokenizer.enc
    bos = enc.encode_single_token("<|bos|>")
    eos_token = "<|bos|>" if source == "base" else "<|assistant_end|>"
    stop_ids = [enc.encode_single_token(eos_token)] + ([] if source == "base" else [bos])
    if fmt == "native":
        state = native.native_state_dict(model)
        config = native.native_config(model, bos, stop_ids[0], dtype_name)
    else:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        config = ours_config(model, bos, stop_ids[0], dtype_name)
    state = {k: v.detach().to("cpu", DTYPES[dtype_name]).contiguous() for k, v in state.items()}

    staging = temp_path_for(out_dir.rstrip(os.sep))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        save_weights(state, staging, max_shard_size)
        _write_json(os.path.join(staging, "config.json"), config)
        _write_json(os.path.join(staging, "generation_config.json"), {
            "bos_token_id": bos, "eos_token_id": stop_ids, "pad_token_id": bos,
            "use_cache": fmt == "native"})
        hf_tokenizer(enc).save(os.path.join(staging, "tokenizer.json"))
        _write_json(os.path.join(staging, "tokenizer_config.json"),
                    tokenizer_config(eos_token, model.config.sequence_len))
        _write_json(os.path.join(staging, META_FILENAME), {
            "source": source, "step": meta.get("step"), "model_config": meta.get("model_config"),
            "user_config": meta.get("user_config"), "format": fmt})
        if fmt == "ours":
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(HERE, name), os.path.join(staging, name))
        card = model_card(model, source, meta, fmt, license, base_model, metrics or {}, repo_id)
        atomic_write_text(os.path.join(staging, "README.md"), str(card))
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return fmt


def _replace_dir(staging, out_dir):
    old = None
    if os.path.exists(out_dir):
        old = temp_path_for(out_dir.rstrip(os.sep) + ".old")
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def model_card(model, source, meta, fmt, license, base_model, metrics, repo_id=None):
    """README.md: front matter the hub reads (license, library, pipeline, base model, metrics) and how to use it."""
    name = f"nanochat-d{model.config.n_layer}-{source}"
    card_data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="text-generation", base_model=base_model,
        tags=["nanochat"], model_name=name,
        eval_results=[EvalResult(task_type="text-generation", dataset_type=metric, dataset_name=metric,
                                 metric_type=METRIC_TYPES.get(metric, "accuracy"), metric_name=metric,
                                 metric_value=value)
                      for metric, value in metrics.items()] or None)
    where = repo_id or "path/to/this/folder"
    remote = ", trust_remote_code=True" if fmt == "ours" else ""
    if source == "base":
        prompt = 'inputs = tokenizer("The capital of France is", return_tensors="pt")  # starts with <|bos|>'
        decode = "print(tokenizer.decode(out[0]))"
    else:
        prompt = ('messages = [{"role": "user", "content": "Why is the sky blue?"}]\n'
                  'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",\n'
                  '                                       return_dict=True)')
        decode = 'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    loads_as = ("transformers' native `nanochat` model type" if fmt == "native" else
                "nanochat's own modeling code (shipped in this folder, so `trust_remote_code=True`); it has no KV "
                "cache: generate() recomputes the sequence for each new token")
    body = f"""
# {name}

A [nanochat](https://github.com/karpathy/nanochat) model: {model.config.n_layer} layers, width {model.config.n_embd},
{sum(p.numel() for p in model.parameters()):,} parameters, context {model.config.sequence_len} tokens, exported from
the `{source}` checkpoint at step {meta.get("step")}. It loads as {loads_as}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{where}"{remote})
model = AutoModelForCausalLM.from_pretrained("{where}"{remote})
{prompt}
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
{decode}
```

The chat template renders conversations as nanochat's `render_conversation` does (pass
`sanitize_control_tokens=True` to keep special-token text inside messages as text, as nanochat does), and
`return_assistant_tokens_mask=True` gives nanochat's SFT loss mask. nanochat itself loads this model with
`python -m scripts.chat_cli -i {where}`.
"""
    if metrics:
        body += "\n## Metrics (from the training run's report)\n\n| metric | value |\n|---|---|\n"
        body += "".join(f"| {k} | {v:.4f} |\n" for k, v in metrics.items())
    return ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n" + body)


def hub_repo_id(url):
    """hf://<org>/<name> -> <org>/<name>."""
    repo_id = url.removeprefix("hf://")
    if not url.startswith("hf://") or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--push-to takes hf://<org>/<name>, got {url!r}")
    return repo_id


def push_folder(folder, repo_id):
    """Upload the folder to the hub repo (created if missing) through huggingface_hub; $HF_ENDPOINT and $HF_TOKEN
    are honoured."""
    api = huggingface_hub.HfApi(endpoint=hf_endpoint())
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                      commit_message="Upload nanochat export")
