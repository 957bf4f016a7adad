# Shared fixtures: small random transformers models of every architecture variant, converted with our converter.
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=320,
            max_position_embeddings=256, rms_norm_eps=1e-6)

# name -> (transformers config class name, extra config, make a Qwen 1 checkpoint from it)
VARIANTS = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4), False),
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0,
                                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                      high_freq_factor=4.0, original_max_position_embeddings=32)),
               False),
    "llama_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True), False),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1000000.0), False),
    "qwen2_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), False),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False), False),
    "qwen1": ("Qwen2Config", dict(num_key_value_heads=4, tie_word_embeddings=False), True),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that logits differ clearly between tokens; norms away from 1 so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def save_as_qwen1(hf_model, out: Path) -> None:
    """Rename a random MHA Qwen2 model into Qwen 1's layout and config (no transformers class exists for Qwen 1)."""
    import json
    from safetensors.torch import save_file
    cfg = hf_model.config
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    q1 = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
          "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        q1[h + "attn.c_attn.weight"] = torch.cat([sd[a + n + "_proj.weight"] for n in "qkv"])
        q1[h + "attn.c_attn.bias"] = torch.cat([sd[a + n + "_proj.bias"] for n in "qkv"])
        q1[h + "attn.c_proj.weight"] = sd[a + "o_proj.weight"]
        q1[h + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        q1[h + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        q1[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        q1[h + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        q1[h + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    save_file(q1, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(
        model_type="qwen", architectures=["QWenLMHeadModel"], hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_hidden_layers=cfg.num_hidden_layers,
        intermediate_size=2 * cfg.intermediate_size, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        layer_norm_epsilon=cfg.rms_norm_eps, rotary_emb_base=cfg.rope_parameters["rope_theta"], rotary_pct=1.0,
        seq_length=cfg.max_position_embeddings, vocab_size=cfg.vocab_size, no_bias=True,
        tie_word_embeddings=False)))


def build_variant(name: str, root: Path):
    """Returns (transformers model in float32 eval mode, folder holding our converted model.pth)."""
    import transformers
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    cls_name, extra, qwen1 = VARIANTS[name]
    cfg = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    randomize_(hf, seed=sum(map(ord, name)))
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf_dir = root / f"{name}-hf"
    if qwen1:
        save_as_qwen1(hf, hf_dir)
    else:
        hf.save_pretrained(hf_dir)
    ckpt_dir = root / name
    convert_hf_checkpoint(hf_dir, ckpt_dir)
    return hf, ckpt_dir


@pytest.fixture(scope="session", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    hf, ckpt_dir = build_variant(request.param, tmp_path_factory.mktemp("variants"))
    return request.param, hf, ckpt_dir


# The Triton kernels compiled for an H100 (sm_90) on this machine, no GPU needed: the Triton interpreter that runs
# them on CPU does not check what the compiler refuses (a loop-carried variable changing shape cost a GPU call once).
def compile_for_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # the jit function under triton.autotune
    signature, consts = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
        else:
            signature[name] = pointers.get(name, "fp32" if name == "eps" else "i32")
    return triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def gemv_float64(x, w, scales=None, bias=None, norm_weight=None, eps=0.0, residual=None, glu=False):
    """model.gemv's contract in float64 torch ops (x [M, K] or [M, 2K] with glu), rounded to its output dtype: the
    reference for the fused block run on CPU and for the kernels in Triton's interpreter (interpret_worker.py)."""
    k, v = w.size(1), x.double()
    if glu:
        v = torch.nn.functional.silu(v[:, :k]) * v[:, k:]
    if norm_weight is not None:
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    y = v @ w.double().T
    y = y if scales is None else y * scales.double()
    y = y if bias is None else y + bias.double()
    y = y if residual is None else y + residual.double()
    dtype = x.dtype if scales is None else torch.promote_types(x.dtype, scales.dtype)
    return y.to(dtype if residual is None else torch.promote_types(dtype, residual.dtype))
