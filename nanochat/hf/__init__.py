"""
Hugging Face layout: export a checkpoint to a folder `transformers` loads with our logits, and load such a folder
(or a hub repo) back into our GPT.

- tokenizer.py: tiktoken ranks <-> tokenizer.json, tokenizer_config.json and the chat template
- native.py: transformers' own `nanochat` model type (the 2025 architecture): when a model fits it, the mapping
- export.py: writing the folder (sharded safetensors, config, generation config, model card) and pushing it
- load.py: reading a folder or hub repo back into a state dict, meta and tokenizer
- configuration_nanochat_gpt.py, modeling_nanochat_gpt.py: the modeling code shipped inside exported folders
  (copied verbatim, loaded by `transformers` with trust_remote_code=True); they import transformers, nothing of ours
"""

import os

# the format of our own modeling code in an exported folder (config.json's model_type, the class auto_map names)
MODEL_TYPE = "nanochat_gpt"
ARCHITECTURE = "NanochatGPTForCausalLM"
META_FILENAME = "nanochat_meta.json"  # where the folder came from (source, step, user_config), for nanochat's tools


def is_exported_folder(path):
    """An exported folder (config.json) rather than one of our checkpoint directories. Here, not in load.py: the
    checkpoint loaders ask it on every load, and load.py imports huggingface_hub (seconds)."""
    return os.path.isfile(os.path.join(path, "config.json"))
