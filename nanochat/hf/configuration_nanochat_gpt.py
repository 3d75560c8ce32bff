"""
Configuration of nanochat's GPT for `transformers` (shipped in exported folders, loaded with trust_remote_code).

The first fields are nanochat's GPTConfig, verbatim, so a folder converts back to a nanochat checkpoint. The
layout the model builds (which layers carry value embeddings, each layer's attention window, the backout layer,
the attention and logit constants) is written out explicitly by the exporter from the model it exported, so this
code never re-derives nanochat's rules and cannot disagree with them.
"""

from transformers import PretrainedConfig


class NanochatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    # nanochat's GPTConfig fields, then the layout the exporter writes out (see the module docstring)
    FIELDS = dict(sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                  window_pattern="SSSL", short_window=0, rope_base=100000.0,
                  padded_vocab_size=32768, window_sizes=None, value_embed_layers=None, backout_layer=6,
                  qk_scale=1.2, logit_softcap=15.0, smear_gate_channels=24, ve_gate_channels=12,
                  initializer_range=0.02)

    def __init__(self, **kwargs):
        for name, default in self.FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.window_sizes is None:
            self.window_sizes = [self.sequence_len] * self.n_layer
        self.window_sizes, self.value_embed_layers = list(self.window_sizes), list(self.value_embed_layers or [])
        kwargs.setdefault("tie_word_embeddings", False)
        # no KV cache in this modeling code: generate() recomputes the sequence (see NanochatGPTForCausalLM)
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
