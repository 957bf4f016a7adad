# The converters against transformers in float32 on CPU: random tiny models written as GGUF files the way llama.cpp
# writes them (permuted q/k for llama, biases for qwen2, q/k norms for qwen3, fused qkv for Qwen 1, F32 and quantized
# tensors), the two real offline models, HF config parsing and checkpoint layouts, and the converters' errors.
import hashlib
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, randomize_

from generate import encode_prompt, generate, load_model
from model import ModelArgs, apply_llama3_scaling
from scripts.convert_gguf import convert_gguf, rope_scaling_from_factors
from scripts.convert_hf_checkpoint import ConvertError, convert_hf_checkpoint, model_args_from_hf_config
from scripts.offline_models import OfflineModelError, gguf_path, join_parts, prepare
from tokenizer import get_tokenizer

Q = gguf.GGMLQuantizationType
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-6)
# GGUF tensor kind -> type (one per layer where a pair); norms and biases stay F32, as llama.cpp keeps them
QUANT_PLAN = {"token_embd": Q.Q8_0, "output": Q.Q6_K, "attn_q": (Q.Q4_0, Q.Q8_0), "attn_k": (Q.Q5_0, Q.Q4_1),
              "attn_v": (Q.Q4_1, Q.Q5_1), "attn_output": (Q.Q5_1, Q.BF16), "ffn_gate": (Q.Q4_K, Q.Q3_K),
              "ffn_up": (Q.Q5_K, Q.Q2_K), "ffn_down": (Q.Q6_K, Q.F16)}
F16_PLAN = {k: Q.F16 for k in ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                "ffn_up", "ffn_down")}
# types the gguf package can quantize; the same for fused and split q/k/v (every row is quantized on its own)
QWEN1_PLAN = {"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_qkv": Q.Q5_0, "attn_q": Q.Q5_0, "attn_k": Q.Q5_0,
              "attn_v": Q.Q5_0, "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.BF16}
# byte offsets of the float16 scales in a block of each K-quant type
KQUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)

# name -> (transformers config class, extra config, GGUF architecture, tensor types)
CASES = {
    "llama": ("LlamaConfig", {}, "llama", None),
    "llama-quant": ("LlamaConfig", {}, "llama", QUANT_PLAN),
    "llama-tied-f16": ("LlamaConfig", dict(tie_word_embeddings=True), "llama", F16_PLAN),
    "llama3-rope-scaling": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE), "llama", QUANT_PLAN),
    "qwen2-quant": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0), "qwen2", QUANT_PLAN),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True), "qwen2", None),
    "qwen3-quant": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False), "qwen3", QUANT_PLAN),
}


# ---------------------------------------------------------------------------------------------------- GGUF writing

def byte_level_chars() -> list:
    """GPT-2's printable stand-in for each byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def add_tiny_tokenizer(w: gguf.GGUFWriter, vocab_size: int) -> None:
    """A byte-level BPE of vocab_size tokens: the 256 bytes, two-letter merges, and two control tokens."""
    pairs = [f"{a} {b}" for a in "etaoinsh" for b in "etaoinsh"][: vocab_size - 258]
    tokens = byte_level_chars() + [p.replace(" ", "") for p in pairs] + ["<|endoftext|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab_size - 2) + [3, 3])
    w.add_token_merges(pairs)
    w.add_bos_token_id(vocab_size - 2)
    w.add_eos_token_id(vocab_size - 1)


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # what llama.cpp's converter does to q and k of llama models: the two rope halves of each head interleaved
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(shape, qtype, rng, std=0.1) -> np.ndarray:
    """Blocks of random codes with sane scales: the gguf package dequantizes K-quants but cannot quantize them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    mult = rng.uniform(0.5, 1.5, raw.shape[:2] + (len(KQUANT_SCALES[qtype]),))

    def with_scale(base):
        for j, off in enumerate(KQUANT_SCALES[qtype]):
            raw[..., off:off + 2] = (base * mult[..., j:j + 1]).astype(np.float16).view(np.uint8)
        return raw.reshape(shape[0], -1).copy()

    return with_scale(std / gguf.quants.dequantize(with_scale(1.0), qtype).std())


def encode(t: np.ndarray, qtype, rng):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    if qtype == Q.F32:
        return t.astype(np.float32), None
    if qtype == Q.F16:
        return t.astype(np.float16), None
    if qtype in KQUANT_SCALES:
        return random_kquant(t.shape, qtype, rng), qtype
    return gguf.quants.quantize(t.astype(np.float32), qtype), qtype


def write_gguf(hf, path, arch: str, plan=None, rope_freqs=None, seed=0) -> None:
    """Write a transformers Llama/Qwen2/Qwen3 model as llama.cpp's converter would, for the architecture arch."""
    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    n_head, n_kv, n_layer = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "qwen":
        w.add_head_count_kv(n_kv)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("llama", "qwen"):
        w.add_rope_dimension_count(head_dim)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
    add_tiny_tokenizer(w, cfg.vocab_size)

    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(n_layer):
        a, b = f"model.layers.{i}.", f"blk.{i}."
        q, k, v = (sd[f"{a}self_attn.{x}_proj.weight"] for x in "qkv")
        if arch == "llama":
            q, k = permute(q, n_head), permute(k, n_kv)
        if arch == "qwen":
            tensors[b + "attn_qkv.weight"] = np.concatenate([q, k, v])
            tensors[b + "attn_qkv.bias"] = np.concatenate([sd[f"{a}self_attn.{x}_proj.bias"] for x in "qkv"])
        else:
            tensors.update({b + "attn_q.weight": q, b + "attn_k.weight": k, b + "attn_v.weight": v})
            for x in "qkv":
                if f"{a}self_attn.{x}_proj.bias" in sd:
                    tensors[f"{b}attn_{x}.bias"] = sd[f"{a}self_attn.{x}_proj.bias"]
        for x in "qk":
            if f"{a}self_attn.{x}_norm.weight" in sd:
                tensors[f"{b}attn_{x}_norm.weight"] = sd[f"{a}self_attn.{x}_norm.weight"]
        tensors[b + "attn_output.weight"] = sd[a + "self_attn.o_proj.weight"]
        tensors[b + "ffn_gate.weight"] = sd[a + "mlp.gate_proj.weight"]
        tensors[b + "ffn_up.weight"] = sd[a + "mlp.up_proj.weight"]
        tensors[b + "ffn_down.weight"] = sd[a + "mlp.down_proj.weight"]
        tensors[b + "attn_norm.weight"] = sd[a + "input_layernorm.weight"]
        tensors[b + "ffn_norm.weight"] = sd[a + "post_attention_layernorm.weight"]
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs

    rng = np.random.default_rng(seed)
    for name, t in tensors.items():
        parts = name.split(".")
        qtype = (plan or {}).get(parts[-2], Q.F32) if t.ndim == 2 else Q.F32
        if isinstance(qtype, tuple):
            qtype = qtype[int(parts[1])]
        data, raw_dtype = encode(t, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------------- references

def tiny_hf(cls_name: str, extra: dict, seed: int):
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize_(hf, seed)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf


def oracle_public(path):
    """transformers' own GGUF loading (config and weights read from the file)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def oracle_from_config(cfg, path):
    """transformers' GGUF tensor reader (dequantizing, undoing llama.cpp's permutation) into a model built from
    the true config: for what its GGUF config parsing misses (rope_freqs, Qwen3's head_dim)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf


@torch.no_grad()
def hf_greedy(hf, ids: list, n: int) -> list:
    """Greedy decoding with transformers' forward and its KV cache: argmax every step, no stop token."""
    out = hf(torch.tensor([ids]), use_cache=True)
    seq = list(ids)
    for step in range(n):
        seq.append(int(out.logits[0, -1].argmax()))
        if step < n - 1:
            out = hf(torch.tensor([seq[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return seq


@torch.no_grad()
def assert_matches(ckpt_dir, hf, n_tokens=20):
    """Prefill + cached decode logits within 1e-4 of the reference, and the same greedy tokens."""
    model = load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits
    model.setup_caches(2, 48)
    got = [model(ids[:, :9], torch.arange(9))] + [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(9, 24)]
    assert ref.abs().max() > 1.0, "logits too small to tell tokens apart"
    torch.testing.assert_close(torch.cat(got, dim=1), ref, atol=1e-4, rtol=0)
    prompt = [3, 17, 42, 7, 99]
    model = load_model(ckpt_dir / "model.pth", "cpu", torch.float32)  # fresh caches for batch 1
    model.setup_caches(1, 32)
    y, _ = generate(model, torch.tensor(prompt, dtype=torch.int), n_tokens, temperature=0)
    assert y[0].tolist() == hf_greedy(hf, prompt, n_tokens)
    return model


# ---------------------------------------------------------------------------------------------------- (a) GGUF

@pytest.mark.parametrize("case", list(CASES))
def test_gguf_matches_transformers(case, tmp_path):
    cls_name, extra, arch, plan = CASES[case]
    hf = tiny_hf(cls_name, extra, seed=sum(map(ord, case)))
    rope_freqs = None
    if "rope_scaling" in extra:  # llama.cpp stores Llama-3 scaling as per-frequency divisors
        d = SMALL["hidden_size"] // SMALL["num_attention_heads"]
        base = 1.0 / (extra["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        rope_freqs = (base / hf.model.rotary_emb.inv_freq).numpy()
        assert (rope_freqs > 1.01).any() and (rope_freqs < 1.01).any()
    path = tmp_path / f"{case}.gguf"
    write_gguf(hf, path, arch, plan, rope_freqs)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    convert_gguf(path, tmp_path / "ckpt")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the input was modified"

    scaled_or_odd_head = rope_freqs is not None or arch == "qwen3"
    oracle = oracle_from_config(hf.config, path) if scaled_or_odd_head else oracle_public(path)
    model = assert_matches(tmp_path / "ckpt", oracle)

    c, args = hf.config, model.config
    assert (args.n_layer, args.dim, args.n_head, args.n_local_heads, args.intermediate_size, args.vocab_size) == \
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
         c.vocab_size)
    assert args.head_dim == (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    assert (args.rope_base, args.norm_eps, args.block_size) == \
        (c.rope_parameters["rope_theta"], c.rms_norm_eps, c.max_position_embeddings)
    assert (args.qkv_bias, args.qk_norm, args.tie_word_embeddings) == \
        (arch == "qwen2", arch == "qwen3", bool(c.tie_word_embeddings))
    if rope_freqs is not None:
        freqs = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        torch.testing.assert_close(apply_llama3_scaling(freqs, args.rope_scaling), hf.model.rotary_emb.inv_freq,
                                   rtol=1e-5, atol=0)
    sd = torch.load(tmp_path / "ckpt" / "model.pth", mmap=True, weights_only=True)
    assert all(t.dtype == torch.float32 for t in sd.values())
    shared = sd["output.weight"].untyped_storage().data_ptr() == sd["tok_embeddings.weight"].untyped_storage().data_ptr()
    assert shared == bool(c.tie_word_embeddings)
    tok = get_tokenizer(tmp_path / "ckpt")
    text = "the seat is hot"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text)


def test_gguf_llama_permutation_is_undone_exactly(tmp_path):
    """F32 weights: the file holds llama.cpp's permuted q/k, transformers recovers the originals, and so do we."""
    hf = tiny_hf("LlamaConfig", {}, seed=5)
    path = tmp_path / "llama.gguf"
    write_gguf(hf, path, "llama")
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    q = hf.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(torch.from_numpy(np.array(stored["blk.0.attn_q.weight"].data)), q)
    oracle = oracle_public(path)
    assert torch.equal(oracle.model.layers[0].self_attn.q_proj.weight, q)
    convert_gguf(path, tmp_path / "ckpt")
    sd = torch.load(tmp_path / "ckpt" / "model.pth", mmap=True, weights_only=True)
    for i, layer in enumerate(hf.model.layers):
        a = layer.self_attn
        assert torch.equal(sd[f"layers.{i}.attention.wqkv.weight"],
                           torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))


def test_gguf_qwen1_matches_its_qwen2_twin(tmp_path):
    """Qwen 1 GGUFs fuse q/k/v into attn_qkv; the same weights written as qwen2 are read by transformers."""
    hf = tiny_hf("Qwen2Config", dict(num_key_value_heads=4, tie_word_embeddings=False), seed=11)
    write_gguf(hf, tmp_path / "qwen1.gguf", "qwen", QWEN1_PLAN)
    write_gguf(hf, tmp_path / "qwen2.gguf", "qwen2", QWEN1_PLAN)
    convert_gguf(tmp_path / "qwen1.gguf", tmp_path / "q1")
    convert_gguf(tmp_path / "qwen2.gguf", tmp_path / "q2")
    sd1, sd2 = (torch.load(tmp_path / d / "model.pth", mmap=True, weights_only=True) for d in ("q1", "q2"))
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert_matches(tmp_path / "q1", oracle_public(tmp_path / "qwen2.gguf"))


ROPE_CASES = [  # head_dim, theta, factor, low, high, original length: from many points in the blend to none
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2
    (64, 10000.0, 4.0, 2.0, 8.0, 256),
    (16, 500000.0, 8.0, 1.0, 4.0, 256),  # one frequency in the blend
    (16, 500000.0, 8.0, 1.0, 4.0, 32),  # none
]


@pytest.mark.parametrize("head_dim,theta,factor,low,high,old", ROPE_CASES)
def test_rope_scaling_recovered_from_rope_freqs(head_dim, theta, factor, low, high, old):
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta,
                                   rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=low,
                                                     high_freq_factor=high, original_max_position_embeddings=old))
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).inv_freq
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = rope_scaling_from_factors(base / ref, head_dim, theta)
    torch.testing.assert_close(apply_llama3_scaling(base, scaling), ref, rtol=1e-5, atol=0)
    if head_dim == 128:  # enough points to find the published numbers themselves
        assert (scaling["factor"], scaling["high_freq_factor"], scaling["original_max_position_embeddings"]) == \
            (factor, high, old)
    assert rope_scaling_from_factors(torch.ones(head_dim // 2), head_dim, theta) is None


# ---------------------------------------------------------------------------------------------------- (b) real models

REAL_PROMPTS = {
    "SmolLM2-135M-Instruct": ["The capital of France is", "def fibonacci(n):",
                              [{"role": "user", "content": "What is 2+2?"}]],
    "Qwen2.5-Coder-0.5B-Instruct": ["def quicksort(arr):",
                                    [{"role": "user", "content": "Reverse a string in Python."}]],
}


@pytest.fixture(scope="session", params=list(REAL_PROMPTS))
def real_model(request):
    """(name, converted checkpoint dir, transformers loading the same GGUF); the oracle is loaded once."""
    name = request.param
    ckpt_dir = prepare(name)
    yield name, ckpt_dir, oracle_public(gguf_path(name))


def test_real_model_greedy_matches_transformers(real_model):
    name, ckpt_dir, hf = real_model
    model = load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    tok = get_tokenizer(ckpt_dir)
    for prompt in REAL_PROMPTS[name]:
        if isinstance(prompt, list):
            ids = torch.tensor(tok.encode_chat(prompt, add_generation_prompt=True), dtype=torch.int)
        else:
            ids = encode_prompt(tok, prompt, "cpu")
        model.setup_caches(1, ids.numel() + 32)
        y, _ = generate(model, ids, 32, temperature=0)
        assert y[0].tolist() == hf_greedy(hf, ids.tolist(), 32), (name, prompt)


def test_prepare_is_cached(real_model):
    name, ckpt_dir, _ = real_model
    assert prepare(name) == ckpt_dir
    stamp = (ckpt_dir / "model.pth").stat().st_mtime_ns
    assert prepare(name) == ckpt_dir
    assert (ckpt_dir / "model.pth").stat().st_mtime_ns == stamp
    args = ModelArgs.from_file(ckpt_dir / "model_config.json")
    assert args.tie_word_embeddings == (name == "SmolLM2-135M-Instruct")  # Qwen's GGUF has its own output.weight


def test_join_parts_checks_sha256(tmp_path):
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(os.urandom(1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    join_parts(parts, tmp_path / "ok.gguf", hashlib.sha256(whole).hexdigest())
    assert (tmp_path / "ok.gguf").read_bytes() == whole
    with pytest.raises(OfflineModelError, match="sha256"):
        join_parts(parts[::-1], tmp_path / "bad.gguf", hashlib.sha256(whole).hexdigest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf", "p0", "p1", "p2"]


# ---------------------------------------------------------------------------------------------------- (c) HF

def hf_llama_config(**rope) -> dict:
    return dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-6, **rope)


def test_hf_config_rope_spellings():
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    spellings = [
        hf_llama_config(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **scaling)),
        hf_llama_config(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **scaling)),  # transformers 5
    ]
    args = [model_args_from_hf_config(c) for c in spellings]
    assert args[0] == args[1]
    assert args[0].rope_base == 500000.0 and args[0].rope_scaling["factor"] == 8.0
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in spellings[0].items() if k != "model_type"})
    assert model_args_from_hf_config(hf_cfg.to_dict()) == args[0]
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg).inv_freq
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    torch.testing.assert_close(apply_llama3_scaling(base, args[0].rope_scaling), ref, rtol=1e-6, atol=0)

    plain = [hf_llama_config(rope_theta=1e6), hf_llama_config(rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=1e6))]
    assert all(model_args_from_hf_config(c).rope_scaling is None and model_args_from_hf_config(c).rope_base == 1e6
               for c in plain)
    with pytest.raises(ConvertError, match="yarn"):
        model_args_from_hf_config(hf_llama_config(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)))
    with pytest.raises(ConvertError, match="unsupported model_type 'gpt2'"):
        model_args_from_hf_config(dict(hf_llama_config(), model_type="gpt2"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random tiny llama saved the usual way (one model.safetensors) and converted."""
    root = tmp_path_factory.mktemp("hf")
    hf = tiny_hf("LlamaConfig", dict(SMALL, hidden_size=64, intermediate_size=96), seed=3)
    hf.save_pretrained(root / "single")
    convert_hf_checkpoint(root / "single", root / "single-out")
    return hf, root, torch.load(root / "single-out" / "model.pth", mmap=True, weights_only=True)


def assert_same_state(ckpt_dir, reference: dict):
    sd = torch.load(ckpt_dir / "model.pth", mmap=True, weights_only=True)
    assert sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)


def test_hf_sharded_safetensors(tiny_llama):
    hf, root, reference = tiny_llama
    hf.save_pretrained(root / "sharded", max_shard_size="100KB")
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    convert_hf_checkpoint(root / "sharded", root / "sharded-out")
    assert_same_state(root / "sharded-out", reference)
    assert_matches(root / "sharded-out", hf, n_tokens=8)


def test_hf_bin_single_and_sharded(tiny_llama):
    hf, root, reference = tiny_llama
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    single, sharded = root / "bin", root / "bin-sharded"
    for d in (single, sharded):
        d.mkdir()
        hf.config.to_json_file(d / "config.json")
    torch.save(sd, single / "pytorch_model.bin")
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, sharded / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for d in (single, sharded):
        convert_hf_checkpoint(d, d.with_name(d.name + "-out"))
        assert_same_state(d.with_name(d.name + "-out"), reference)


# ---------------------------------------------------------------------------------------------------- CLI errors

def run_cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def assert_user_error(done, *words):
    assert done.returncode != 0
    err = done.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def tiny_gguf(path, arch="llama", extra_tensor=None):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in ((f"{arch}.block_count", 1), (f"{arch}.embedding_length", 32), (f"{arch}.context_length", 64),
                       (f"{arch}.feed_forward_length", 64), (f"{arch}.attention.head_count", 2)):
        w.add_uint32(key, value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (40, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (32, 32),
              "blk.0.attn_v.weight": (32, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    if extra_tensor:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_convert_gguf_cli(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf")
    done = run_cli("convert_gguf.py", "--gguf", good, "--checkpoint_dir", tmp_path / "out", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    sd = torch.load(tmp_path / "out" / "model.pth", mmap=True, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert ModelArgs.from_file(tmp_path / "out" / "model_config.json").tie_word_embeddings

    bad_type = tiny_gguf(tmp_path / "int.gguf", extra_tensor=("blk.0.attn_q.bias", np.arange(32, dtype=np.int32)))
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a gguf file\n" * 10)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    cases = [(tmp_path / "missing.gguf", ["not found"]), (not_gguf, ["not a GGUF"]), (truncated, ["truncated"]),
             (tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), ["unsupported GGUF architecture 'gpt2'"]),
             (bad_type, ["I32", "not supported"])]
    for path, words in cases:
        before = path.read_bytes() if path.exists() else None
        out = tmp_path / f"out-{path.stem}"
        assert_user_error(run_cli("convert_gguf.py", "--gguf", path, "--checkpoint_dir", out), *words)
        assert not (out / "model.pth").exists()
        assert (path.read_bytes() if path.exists() else None) == before


def test_convert_hf_cli_errors(tiny_llama, tmp_path):
    hf, root, _ = tiny_llama
    assert_user_error(run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", tmp_path / "nowhere"), "not found")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((root / "single" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert_user_error(run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", corrupt), "corrupt")
    (corrupt / "config.json").write_text(json.dumps(dict(hf_llama_config(), model_type="gpt2")))
    assert_user_error(run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", corrupt), "unsupported model_type")
    (corrupt / "config.json").write_text((root / "single" / "config.json").read_text())
    (corrupt / "model.safetensors").unlink()
    (corrupt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1-of-2.safetensors"}}))
    assert_user_error(run_cli("convert_hf_checkpoint.py", "--checkpoint_dir", corrupt), "missing")
