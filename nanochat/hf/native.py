"""
transformers' own `nanochat` model type (NanoChatForCausalLM, no remote code): nanochat's 2025 architecture.

It has token embedding -> RMSNorm, pre-norm blocks with rotary (same half-split orientation) + QK-norm + GQA
attention over the whole causal context, relu^2 MLP, final norm, untied lm_head, logit softcap 15. It has none of:
per-layer resid/x0 lambdas, smear, value embeddings, backout, sliding windows, the 1.2 QK scale.

A GPT **fits** the native type when the native model computes the same function on every input up to its
context length (sequence_len tokens), with every tensor it drops contributing exactly zero:
- resid_lambdas all exactly 1 and x0_lambdas all exactly 0 (x = 1*x + 0*x0 = x);
- smear_lambda exactly 0 (the smear adds 0 * gate * x[t-1]; smear_gate is then unused);
- backout_lambda exactly 0;
- every value-embedding table is zero on the rows a token can read (V gains 3*sigmoid(gate)*0; ve_gate unused);
- every layer's window is >= sequence_len (an "L" layer: within the context, plain causal attention);
- the attention scale is 1/sqrt(head_dim), i.e. GPTConfig.qk_scale == 1.0. Ours default to 1.2 (nanochat's
  current recipe), so models trained here ship our modeling code; native folders (the 2025 architecture, e.g.
  published nanochat models) import as GPTs with qk_scale 1.0.
The rows of the padded vocab are never read (ids < vocab_size, logits cropped), so they are dropped; norms use
the fp32 machine epsilon like ours. Anything else is refused with the list of what does not map.
"""


import torch

from nanochat.gpt import GPT, GPTConfig, SOFTCAP

MODEL_TYPE = "nanochat"
ARCHITECTURE = "NanoChatForCausalLM"
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # our norm's eps in fp32, the precision exports are checked in


class UnmappableError(ValueError):
    """A checkpoint (or folder) holds something the target cannot represent exactly."""

    def __init__(self, what, problems):
        self.problems = problems
        super().__init__(f"{what}:\n  - " + "\n  - ".join(problems))


def native_mismatches(model):
    """Why `model` (our GPT) does not compute what the native type computes; [] when it fits (module docstring)."""
    config, problems = model.config, []
    if not torch.all(model.resid_lambdas == 1):
        problems.append(f"resid_lambdas = {model.resid_lambdas.tolist()} (per-layer residual scales; native: all 1)")
    if torch.any(model.x0_lambdas != 0):
        problems.append(f"x0_lambdas = {model.x0_lambdas.tolist()} (per-layer x0 mixing; native: all 0)")
    if model.smear_lambda.item() != 0:
        problems.append(f"smear_lambda = {model.smear_lambda.item():.6g} with smear_gate.weight (smear; native: none)")
    if model.backout_lambda.item() != 0:
        problems.append(f"backout_lambda = {model.backout_lambda.item():.6g} (backout; native: none)")
    for i, table in model.value_embeds.items():
        if torch.any(table.weight[:config.vocab_size] != 0):
            problems.append(f"value_embeds.{i}.weight with transformer.h.{i}.attn.ve_gate.weight "
                            f"(value embeddings; native: none)")
    windowed = [i for i, w in enumerate(model.window_sizes) if w < config.sequence_len]
    if windowed:
        problems.append(f"sliding windows on layers {windowed} (window_pattern={config.window_pattern!r}, "
                        f"windows {model.window_sizes}; native attends to the whole context)")
    if qk_scale(model) != 1.0:
        problems.append(f"QK scale {qk_scale(model)} on q and k after QK-norm (native: none, attention scale "
                        f"1/sqrt(head_dim))")
    return problems


def qk_scale(model):
    """The factor the model applies to q and k after QK-norm."""
    return model.config.qk_scale


def native_state_dict(model):
    """Our state dict under NanoChatForCausalLM's names; raises UnmappableError unless the model fits."""
    problems = native_mismatches(model)
    if problems:
        raise UnmappableError("This checkpoint does not fit transformers' native nanochat type "
                              "(export without --format native to ship our modeling code instead)", problems)
    state = dict(model.state_dict())
    vocab = model.config.vocab_size
    out = {"model.embed_tokens.weight": state.pop("transformer.wte.weight")[:vocab],
           "lm_head.weight": state.pop("lm_head.weight")[:vocab]}
    for i in range(model.config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for a, b in [("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"),
                     ("attn.c_v", "self_attn.v_proj"), ("attn.c_proj", "self_attn.o_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
            out[f"{theirs}{b}.weight"] = state.pop(f"{ours}{a}.weight")
    # checked above to contribute exactly nothing
    for name in [n for n in state if _is_neutral_in_native(n)]:
        del state[name]
    if state:
        raise UnmappableError("These tensors have no place in transformers' native nanochat type", sorted(state))
    return {k: v.contiguous() for k, v in out.items()}


def _is_neutral_in_native(name):
    return (name in ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")
            or name.startswith("value_embeds.") or name.endswith(".attn.ve_gate.weight"))


def native_config(model, bos_token_id, eos_token_id, dtype_name):
    config = model.config
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_theta": config.rope_base,  # transformers 4.x reads this one
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,  # a padding_idx would freeze that token's embedding when fine-tuning
        "dtype": dtype_name,
    }


def from_native(config, state):
    """(model_config, our state dict) from a native folder's config.json and tensors. What the native type lacks
    gets its neutral value (lambdas 1/0, smear/backout/value embeddings 0, padded rows 0); anything the native
    config or tensors hold that our GPT cannot compute is refused, listed."""
    problems = _native_config_problems(config)
    if problems:
        raise UnmappableError("This native nanochat config does not map onto our GPT", problems)
    model_config = {"sequence_len": config["max_position_embeddings"], "vocab_size": config["vocab_size"],
                    "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
                    "n_kv_head": config.get("num_key_value_heads") or config["num_attention_heads"],
                    "n_embd": config["hidden_size"], "window_pattern": "L", "rope_base": _rope_theta(config),
                    "qk_scale": 1.0}
    state = dict(state)
    with torch.device("meta"):  # shapes only
        template = GPT(GPTConfig(**model_config)).state_dict()
    out = {}
    for name, like in template.items():
        native_name = _native_name(name)
        if native_name is None:
            out[name] = torch.ones(like.shape) if name == "resid_lambdas" else torch.zeros(like.shape)
            continue
        if native_name not in state:
            raise UnmappableError("This native nanochat folder is incomplete", [f"missing tensor {native_name}"])
        tensor = state.pop(native_name)
        if tensor.shape != like.shape:  # wte / lm_head: our rows are padded to a multiple of 64
            tensor = torch.cat([tensor, tensor.new_zeros(like.shape[0] - tensor.shape[0], *like.shape[1:])])
        out[name] = tensor
    if state:
        raise UnmappableError("These tensors of the native nanochat folder have no place in our GPT", sorted(state))
    return model_config, out


def _native_name(name):
    if name == "transformer.wte.weight":
        return "model.embed_tokens.weight"
    if name == "lm_head.weight":
        return name
    if _is_neutral_in_native(name):
        return None
    for a, b in [(".attn.c_q.", ".self_attn.q_proj."), (".attn.c_k.", ".self_attn.k_proj."),
                 (".attn.c_v.", ".self_attn.v_proj."), (".attn.c_proj.", ".self_attn.o_proj."),
                 (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]:
        if a in name:
            return name.replace("transformer.h.", "model.layers.").replace(a, b)
    raise ValueError(f"no native name for {name}")  # a GPT parameter this mapping does not know: update it


def _rope_theta(config):
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _native_config_problems(config):
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    expected = {"hidden_act": "relu2", "intermediate_size": 4 * hidden, "attention_bias": False,
                "tie_word_embeddings": False, "final_logit_softcapping": SOFTCAP, "head_dim": hidden // heads}
    problems = [f"{key} = {config[key]!r} (ours: {value!r})" for key, value in expected.items()
                if key in config and config[key] != value]
    if config.get("rms_norm_eps", 1e-6) != RMS_NORM_EPS:
        problems.append(f"rms_norm_eps = {config.get('rms_norm_eps', 1e-6)!r} (ours: fp32 machine epsilon "
                        f"{RMS_NORM_EPS!r})")
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        problems.append(f"rope scaling {rope_type!r} (ours: plain rotary)")
    return problems
