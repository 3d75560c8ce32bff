"""
Hugging Face export/import: `transformers` loading an exported folder gives our logits (fp32, 1e-4) and our token
ids, for a tiny random model with every architecture feature on (value embeddings, smear, backout, a sliding window
shorter than the sequence, GQA, padded vocab) through our shipped modeling code, and for a model that fits
transformers' native nanochat type, loaded without remote code. The chat template renders like
render_conversation; what does not map is refused by name; load_model reads the folder back with the same logits.
"""
import hashlib
import http.server
import io
import json
import os
import random
import threading

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat.checkpoint_manager import load_model
from nanochat.cli import UserError
from nanochat.gpt import GPTConfig
from nanochat.hf.export import export_model
from nanochat.hf.native import UnmappableError
from nanochat.report import Report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer
from scripts import chat_cli, chat_sft, export_hf

# 4 layers: value embeddings on 1 and 3, backout after 2; "SL" with a 4-token short window, sequences of 24 tokens;
# 4 query heads on 2 kv heads; the 400-token vocab is padded to 448
FULL_CONFIG = dict(sequence_len=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL", short_window=4)
NATIVE_CONFIG = dict(sequence_len=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="L", qk_scale=1.0)
TRICKY_TEXTS = ["Hello world!", "I'm here, you're there, we'll see. DON'T", "12345678901 a1b22c333",
                "   leading and trailing   ", "tabs\t\tand\r\nCRLF\n\n\n", "emoji 🙂👍🏽 日本語テキスト",
                "naïve café über", "x = [1, 2, 3]; y = {'a': 1}", "\u00a0nbsp\u2003em\u200bzw", "'s's'S'll've're",
                "?!?!... ---", "a" * 60, ""]


# Runs of letters from a small alphabet: pieces are long and rarely whole tokens, so they encode through many
# competing merges, whose order must be tiktoken's (words alone would mostly be single tokens)
MERGE_ALPHABET = "abcdé日1 "


def merge_heavy_text(rng, length):
    return "".join(rng.choice(MERGE_ALPHABET) for _ in range(length))


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    words = ["hello", "world", "the", "don't", "1234567", " ", "\n\n", "naïve", "日本語", "🙂", "x=y+1;", "sky"]
    docs = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(100)]
    docs += [merge_heavy_text(rng, 300) for _ in range(100)]
    return RustBPETokenizer.train_from_iterator(iter(docs), 400)


@pytest.fixture(scope="module")
def random_gpt(build_gpt, tokenizer):
    """make(seed, **config) -> a GPT over `tokenizer` whose every parameter (lambdas, gates, padded rows included) is
    random, so each one shows in the logits."""
    def make(seed, **config):
        return build_gpt(GPTConfig(vocab_size=tokenizer.get_vocab_size(), **config), seed, randomize=True)
    return make


@pytest.fixture(scope="module")
def save_run(save_tokenizer, save_model_checkpoint, tokenizer):
    """save(base_dir, model): the tokenizer and the model as an SFT run's checkpoint d4, step 7."""
    def save(base_dir, model):
        save_tokenizer(tokenizer, base_dir)
        save_model_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", "d4"), 7, model,
                              {"user_config": {"depth": model.config.n_layer}})
    return save


def batch_ids(tokenizer, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokenizer.get_vocab_size(), (2, seq_len), generator=g)


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, random_gpt, save_run):
    """The every-feature model as an SFT checkpoint, exported by the CLI with small shards; (model, folder)."""
    base = tmp_path_factory.mktemp("base")
    out = str(tmp_path_factory.mktemp("export") / "d4-sft")
    model = random_gpt(seed=1, **FULL_CONFIG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        save_run(str(base), model)
        Report(str(base / "report")).log(section="Chat evaluation sft", data=[{"ARC-Easy": 0.3125, "GSM8K": 0.05}])
        assert export_hf.main(["--source", "sft", "--out", out, "--max-shard-size", "60KB"]) == 0
    return model, out


@pytest.fixture(scope="module")
def hf_full(full_export):
    model, info = AutoModelForCausalLM.from_pretrained(full_export[1], trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info.values()), info  # every tensor in the folder found its parameter, and the reverse
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(full_export):
    return AutoTokenizer.from_pretrained(full_export[1], trust_remote_code=True)


# -----------------------------------------------------------------------------
# every architecture feature, through our shipped modeling code

def test_full_feature_model_gives_our_logits(full_export, hf_full, tokenizer):
    model, out = full_export
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "nanochat_gpt" and "AutoModelForCausalLM" in config["auto_map"]
    assert config["window_sizes"] == [4, 32, 4, 32] and config["value_embed_layers"] == [1, 3]
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # sharded at 60KB
    assert type(hf_full).__name__ == "NanochatGPTForCausalLM"
    ids = batch_ids(tokenizer, 24)  # longer than the 4-token window
    with torch.no_grad():
        ours, theirs = model(ids), hf_full(input_ids=ids).logits
    assert theirs.shape == ours.shape == (2, 24, tokenizer.get_vocab_size())
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # the HF loss is the shifted cross-entropy of the same logits
    with torch.no_grad():
        loss = hf_full(input_ids=ids, labels=ids).loss
        assert torch.allclose(loss, model(ids[:, :-1], targets=ids[:, 1:]), atol=1e-4)


def test_full_feature_model_generates_our_tokens(full_export, hf_full, hf_tokenizer, tokenizer):
    model, _ = full_export
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hello sky"}])
    ours = list(model.generate(prompt, max_tokens=8, temperature=0))
    inputs = hf_tokenizer.apply_chat_template([{"role": "user", "content": "hello sky"}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
    assert inputs["input_ids"][0].tolist() == prompt
    out = hf_full.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_sequence_its_own_logits(full_export, hf_full, hf_tokenizer, tokenizer, side):
    model, _ = full_export
    texts = ["hello sky world", "abcdé日1 the naïve 🙂 sky x=y+1; don't"]  # 4 and 24 tokens with <|bos|>
    hf_tokenizer.padding_side = side
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = hf_full(**batch).logits
        for row, text in enumerate(texts):
            ids = tokenizer.encode(text, prepend="<|bos|>")
            real = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row, real], model(torch.tensor([ids]))[0], atol=1e-4, rtol=0)
    if side == "left":  # batched generation, the way transformers does it
        out = hf_full.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
        for row, text in enumerate(texts):
            ours = list(model.generate(tokenizer.encode(text, prepend="<|bos|>"), max_tokens=5, temperature=0))
            assert out[row, batch["input_ids"].shape[1]:].tolist() == ours


def test_exported_model_fine_tunes_with_transformers(full_export, tokenizer):
    hf = AutoModelForCausalLM.from_pretrained(full_export[1], trust_remote_code=True, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-3)
    ids = batch_ids(tokenizer, 24, seed=3)
    losses = []
    for _ in range(5):
        loss = hf(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in hf.parameters())  # every nanochat feature takes part in training
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tokenizer_gives_our_ids(hf_tokenizer, tokenizer):
    rng = random.Random(1)
    for text in TRICKY_TEXTS + [merge_heavy_text(rng, rng.randint(1, 80)) for _ in range(200)]:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, prepend="<|bos|>"), text
        ids = tokenizer.encode(text)
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids)
    # special-token text typed by a user stays text when asked to (our encode never parses it)
    assert hf_tokenizer("say <|bos|>", add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
        tokenizer.encode("say <|bos|>")
    specials = ["<|bos|>", "<|user_start|>", "<|assistant_end|>", "<|output_end|>"]
    assert hf_tokenizer.convert_tokens_to_ids(specials) == [tokenizer.encode_special(s) for s in specials]


CONVERSATIONS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "don't"},
     {"role": "assistant", "content": "naïve"}, {"role": "user", "content": "1234567 x=y+1;"},
     {"role": "assistant", "content": "the sky"}],
    [{"role": "user", "content": "compute"}, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me see. "}, {"type": "python", "text": "1234567 + 1"},
        {"type": "python_output", "text": "1234568"}, {"type": "text", "text": " It is 1234568."}]}],
    [{"role": "user", "content": "what is <|assistant_end|> here?"}, {"role": "assistant", "content": "text"}],
]


def chat_ids(hf_tokenizer, conversation, **kwargs):
    # sanitize_control_tokens: special-token text inside a message stays text, as in our renderer
    return hf_tokenizer.apply_chat_template(conversation, return_dict=True, sanitize_control_tokens=True,
                                            **kwargs)["input_ids"]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_renders_like_render_conversation(hf_tokenizer, tokenizer, conversation):
    ids, mask = tokenizer.render_conversation(conversation)
    assert chat_ids(hf_tokenizer, conversation) == ids
    if "<|" not in json.dumps(conversation):  # (transformers sanitizes or masks, not both at once)
        rendered = hf_tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
        assert rendered["input_ids"] == ids
        assert rendered["assistant_masks"] == mask  # {% generation %} spans are our training mask
    # generation prompt: the trailing assistant message is dropped, <|assistant_start|> appended
    prompt = chat_ids(hf_tokenizer, conversation, add_generation_prompt=True)
    assert prompt == tokenizer.render_for_completion(conversation)
    assert chat_ids(hf_tokenizer, conversation[:-1], add_generation_prompt=True) == prompt


def test_chat_template_refuses_bad_roles(hf_tokenizer):
    with pytest.raises(Exception, match="alternate"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_exported_folder_loads_back_with_same_logits(full_export, tokenizer):
    model, out = full_export
    loaded, loaded_tokenizer, meta = load_model(out, "cpu", "eval")
    ids = batch_ids(tokenizer, 24, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=0)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert meta["step"] == 7 and meta["user_config"] == {"depth": 4} and meta["model_config"]["short_window"] == 4
    for text in TRICKY_TEXTS:
        assert loaded_tokenizer.encode(text) == tokenizer.encode(text)
    conversation = CONVERSATIONS[2]
    assert loaded_tokenizer.render_conversation(conversation) == tokenizer.render_conversation(conversation)
    with pytest.raises(ValueError, match="one exported model"):
        load_model(out, "cpu", "eval", step=3)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The hub endpoints snapshot_download uses (repo info, file tree, resolve), serving one local folder."""
    folder, commit, requests = None, "c" * 40, []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._resolve(send_body=False)

    def do_GET(self):
        FakeHub.requests.append(self.path)
        files = sorted(os.listdir(self.folder))
        if self.path.startswith("/api/models/org/name/tree/"):
            self._send(json.dumps([{"type": "file", "path": f, "size": os.path.getsize(os.path.join(self.folder, f)),
                                    "oid": "0" * 40} for f in files]).encode())
        elif self.path.startswith("/api/models/org/name/revision/"):
            self._send(json.dumps({"id": "org/name", "sha": self.commit,
                                   "siblings": [{"rfilename": f} for f in files]}).encode())
        else:
            self._resolve(send_body=True)

    def _resolve(self, send_body):
        prefix = f"/org/name/resolve/{self.commit}/"
        path = os.path.join(self.folder, self.path[len(prefix):]) if self.path.startswith(prefix) else ""
        if not os.path.isfile(path):
            return self._send(b"", status=404)
        data = open(path, "rb").read()
        self._send(data if send_body else None, length=len(data), etag=hashlib.sha256(data).hexdigest())

    def _send(self, body, status=200, length=None, etag=None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("X-Repo-Commit", self.commit)
        if etag:
            self.send_header("ETag", f'"{etag}"')
        self.end_headers()
        if body:
            self.wfile.write(body)


def test_load_model_from_a_hub_repo_id(full_export, tokenizer, monkeypatch):
    model, out = full_export
    FakeHub.folder = out
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        loaded, _, meta = load_model("hf://org/name", "cpu", "eval")
    finally:
        server.shutdown()
    assert any(path.startswith("/org/name/resolve/") for path in FakeHub.requests)  # HF_ENDPOINT was used
    ids = batch_ids(tokenizer, 24, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=0)


def test_chat_cli_talks_to_an_exported_folder(full_export, tokenizer):
    model, out = full_export
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hello sky"}])
    answer = list(model.generate(prompt, max_tokens=6, temperature=0))
    printed = io.StringIO()
    chat_cli.main(["--device-type", "cpu", "-i", out, "-p", "hello sky", "-t", "0", "-m", "6"], out=printed)
    assert tokenizer.decode(answer) in printed.getvalue()


def test_model_card_front_matter(full_export):
    card = ModelCard.load(os.path.join(full_export[1], "README.md"))
    data = card.data.to_dict()
    assert (data["license"], data["library_name"], data["pipeline_tag"]) == ("mit", "transformers", "text-generation")
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics == {"ARC-Easy": 0.3125, "GSM8K": 0.05}  # the report's SFT column


# -----------------------------------------------------------------------------
# a model that fits transformers' native nanochat type

def neutral_for_native(model):
    """What the native type lacks, set to its neutral value (the model then computes the 2025 architecture)."""
    with torch.no_grad():
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.zero_()
        model.smear_lambda.zero_()
        model.backout_lambda.zero_()
        for table in model.value_embeds.values():
            table.weight.zero_()
    return model


def test_native_fit_loads_without_remote_code_and_back(tmp_path, tokenizer, random_gpt, monkeypatch):
    model = neutral_for_native(random_gpt(seed=2, **NATIVE_CONFIG))
    out = str(tmp_path / "native")
    assert export_model(model, tokenizer, {"step": 3}, out, "base") == "native"
    assert not any(name.endswith(".py") for name in os.listdir(out))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(hf).__name__ == "NanoChatForCausalLM"
    ids = batch_ids(tokenizer, NATIVE_CONFIG["sequence_len"])  # the whole context
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
        loaded, _, _ = load_model(out, "cpu", "eval")
        torch.testing.assert_close(loaded(ids), ours, atol=1e-6, rtol=0)
    assert loaded.config.qk_scale == 1.0  # the native type has no QK scale: imported as the 2025 architecture


def test_qk_scale_alone_keeps_a_model_off_the_native_type(tmp_path, tokenizer, random_gpt):
    model = neutral_for_native(random_gpt(seed=2, **{**NATIVE_CONFIG, "qk_scale": 1.2}))
    with pytest.raises(UnmappableError) as refused:
        export_model(model, tokenizer, {}, str(tmp_path / "a"), "base", fmt="native")
    assert len(refused.value.problems) == 1 and "QK scale" in refused.value.problems[0]
    assert export_model(model, tokenizer, {}, str(tmp_path / "b"), "base") == "ours"


def test_export_refuses_native_for_full_model_naming_what_does_not_map(_isolated_base_dir, random_gpt, save_run,
                                                                      capsys):
    save_run(str(_isolated_base_dir), random_gpt(seed=1, **FULL_CONFIG))
    out = str(_isolated_base_dir / "out")
    assert export_hf.main(["--source", "sft", "--out", out, "--format", "native"]) == 2
    err = capsys.readouterr().err
    for what in ["resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda", "value_embeds.1.weight",
                 "value_embeds.3.weight", "sliding windows on layers [0, 2]", "QK scale"]:
        assert what in err, what
    assert not os.path.exists(out)


def test_import_refuses_what_does_not_map(tmp_path, tokenizer, random_gpt, monkeypatch):
    out = str(tmp_path / "native")
    export_model(neutral_for_native(random_gpt(seed=2, **NATIVE_CONFIG)), tokenizer, {}, out, "base")
    from safetensors.torch import load_file, save_file
    weights = load_file(os.path.join(out, "model.safetensors"))
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
              os.path.join(out, "model.safetensors"))
    with pytest.raises(UnmappableError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(out, "cpu", "eval")
    config = json.load(open(os.path.join(out, "config.json")))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config, "model_type": "llama"}, f)
    with pytest.raises(UnmappableError, match="llama"):
        load_model(out, "cpu", "eval")


def test_chat_sft_fine_tunes_a_published_model(full_export, tokenizer, tmp_path, monkeypatch):
    """--source <exported folder> in a fresh base dir: the folder's tokenizer is installed there, SFT starts from
    its weights (a fresh optimizer: the folder has none), and the result loads as an ordinary SFT checkpoint. A
    base dir holding another tokenizer is refused."""
    model, out = full_export
    base = tmp_path / "fresh"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    rows = [[{"role": "user", "content": f"hello sky {i}"}, {"role": "assistant", "content": "the big red sun"}]
            for i in range(6)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--device-type", "cpu", "--source", out, "--custom-only", "--extra-train-jsonl", str(data),
            "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64", "--eval-tokens", "64",
            "--chatcore-every", "-1", "--num-iterations", "2", "--output-tag", "mine",
            "--embedding-lr", "1e-5", "--unembedding-lr", "1e-5", "--matrix-lr", "1e-5"]  # small steps: see below
    result = chat_sft.main(args)
    assert result["step"] == 2
    assert get_tokenizer().fingerprint() == tokenizer.fingerprint()
    tuned, _, meta = load_model("sft", "cpu", "eval", model_tag="mine")
    published, trained = model.state_dict(), tuned.state_dict()
    matrices = [name for name, t in published.items() if t.dim() == 2 and name != "smear_gate.weight"]  # (a scalar LR)
    for name in matrices:  # the LRs of every matrix were tiny: each is still the published one, nearly
        torch.testing.assert_close(trained[name], published[name], atol=1e-3, rtol=0, msg=name)
    assert any(not torch.equal(trained[name], published[name]) for name in matrices)  # and it did train
    other = RustBPETokenizer.train_from_iterator(iter(["a different corpus entirely"] * 20), vocab_size=300)
    other.save(str(tmp_path / "other" / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "other"))
    with pytest.raises(UserError, match="another tokenizer"):
        chat_sft.main(args)
