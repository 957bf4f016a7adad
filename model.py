# The transformer: Llama and Qwen (1, 1.5, 2, 2.5, 3) in one set of modules, with a static KV cache.
# Family differences are ModelArgs fields whose defaults mean "plain Llama".
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

try:  # the decode attention kernel below is Triton; installs without it (CPU) use SDPA
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    block_size: int = 2048  # longest context the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1  # key/value heads; -1 means n_head (no GQA)
    head_dim: Optional[int] = None  # Qwen3 sets it apart from dim // n_head
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low/high_freq_factor, original_max_position_embeddings
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen 1 / 1.5 / 2 / 2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.intermediate_size = find_multiple(hidden, 256)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "llama3") not in ("llama3", "default"):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling}: only llama3 scaling is implemented")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        # Exact names only: a wrong guess would silently give a model the wrong shape.
        if name not in transformer_configs:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(transformer_configs)}")
        return cls(**transformer_configs[name])

    @classmethod
    def from_file(cls, path) -> "ModelArgs":
        cfg = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}")
        return cls(**cfg)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


CONFIG_NAME = "model_config.json"  # beside model.pth; HF's config.json stays untouched


class CheckpointError(ValueError):
    """A checkpoint or its config is missing or unreadable; the message says what to do."""


def open_checkpoint(path) -> tuple[ModelArgs, dict]:
    """The config beside a checkpoint and its state dict, memory-mapped (nothing is read until used)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: prepare one with scripts/prepare.sh (see README)")
    config_path = path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: convert the checkpoint with scripts/convert_hf_checkpoint.py "
                              "or scripts/convert_gguf.py, which write it beside model.pth")
    try:
        args = ModelArgs.from_file(config_path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path} is not a valid model config ({e}): convert the checkpoint again")
    try:
        checkpoint = torch.load(str(path), mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or incomplete; "
                              "convert or download it again")
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} does not hold a state dict: convert the checkpoint again")
    return args, checkpoint

# Real shapes, used by the benchmark with random weights. Checkpoints carry their own config.
_llama3_rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
transformer_configs = {
    "llama-2-7b": dict(n_layer=32, n_head=32, dim=4096, vocab_size=32000, block_size=4096),
    "llama-2-13b": dict(n_layer=40, n_head=40, dim=5120, vocab_size=32000, block_size=4096),
    "llama-2-70b": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672,
                        vocab_size=32000, block_size=4096),
    "llama-3-8b": dict(n_layer=32, n_head=32, dim=4096, n_local_heads=8, intermediate_size=14336,
                       vocab_size=128256, rope_base=500000.0, block_size=8192),
    "llama-3.1-8b": dict(n_layer=32, n_head=32, dim=4096, n_local_heads=8, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000.0, block_size=131072, rope_scaling=_llama3_rope),
    "llama-3.2-1b": dict(n_layer=16, n_head=32, dim=2048, n_local_heads=8, intermediate_size=8192, head_dim=64,
                         vocab_size=128256, rope_base=500000.0, block_size=131072, tie_word_embeddings=True,
                         rope_scaling=dict(_llama3_rope, factor=32.0)),
    "qwen2.5-0.5b": dict(n_layer=24, n_head=14, dim=896, n_local_heads=2, intermediate_size=4864,
                         vocab_size=151936, rope_base=1000000.0, norm_eps=1e-6, block_size=32768,
                         qkv_bias=True, tie_word_embeddings=True),
    "qwen2.5-7b": dict(n_layer=28, n_head=28, dim=3584, n_local_heads=4, intermediate_size=18944,
                       vocab_size=152064, rope_base=1000000.0, norm_eps=1e-6, block_size=32768, qkv_bias=True),
    "qwen3-8b": dict(n_layer=36, n_head=32, dim=4096, n_local_heads=8, intermediate_size=12288, head_dim=128,
                     vocab_size=151936, rope_base=1000000.0, norm_eps=1e-6, block_size=40960, qk_norm=True),
    "smollm2-135m": dict(n_layer=30, n_head=9, dim=576, n_local_heads=3, intermediate_size=1536, vocab_size=49152,
                         rope_base=100000.0, block_size=8192, tie_word_embeddings=True),
}


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype=torch.bfloat16):
        super().__init__()
        cache_shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor):
        # input_pos: [S], k_val: [B, H, S, D]; a batch smaller than the cache's uses its first rows
        k_out, v_out = self.k_cache[: k_val.size(0)], self.v_cache[: k_val.size(0)]
        k_out.index_copy_(2, input_pos, k_val)
        v_out.index_copy_(2, input_pos, v_val)
        return k_out, v_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 whatever the model dtype, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def precompute_rope(seq_len: int, head_dim: int, base: float, rope_scaling: Optional[dict] = None) -> Tensor:
    """cos and sin for every position, stacked as [seq_len, 2, head_dim // 2], in float32."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope_scaling is not None and rope_scaling.get("rope_type", "llama3") == "llama3":
        freqs = apply_llama3_scaling(freqs, rope_scaling)
    t = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def apply_llama3_scaling(freqs: Tensor, s: dict) -> Tensor:
    # Llama-3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_len / low, freqs / factor, blended)
    return torch.where(wavelen < old_len / high, freqs, out)


def apply_rotary_emb(x: Tensor, rope: Tensor) -> Tensor:
    # x: [B, S, H, D] with the two rotated halves side by side (the Hugging Face layout); rope: [S, 2, D // 2]
    cos = rope[None, :, None, 0].repeat(1, 1, 1, 2)
    sin = rope[None, :, None, 1].repeat(1, 1, 1, 2)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch for this file's Triton kernels (Hopper and later) when inductor's kernels use it
    too (generate.py turns it on)."""
    import torch._inductor.config as inductor_config
    return getattr(inductor_config.triton, "enable_pdl", False) and device.type == "cuda" and \
        torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache
def sm_count(device) -> int:  # asked once per device, not per layer and step
    return torch.cuda.get_device_properties(device).multi_processor_count


# Decode attention. For a few query positions per sequence (decode, speculative verify) SDPA reads the whole
# allocated cache under a mask and costs about 11 us per layer in three kernels on an H100 (scripts/bench_notes.md);
# this kernel reads only the keys up to the last position, every query head of a key/value head in one program
# (GQA without repeating K and V), the cache split along its length over the GPU's SMs, then one combine.
if triton is not None:
    @triton.jit
    def _rope(X, live, R, s, NW, eps, D: tl.constexpr, NORM: tl.constexpr, dtype: tl.constexpr):
        """Rows X + [0, D) (pointers [rows, D]) at positions s -> RMSNorm with weight NW (NORM) and rope as
        apply_rotary_emb, in dtype. The rotated partner of element d (d + D/2 or d - D/2) is read from memory."""
        d = tl.arange(0, D)
        dp = (d + D // 2) % D
        x = tl.load(X, mask=live[:, None], other=0.0).to(tl.float32)
        xp = tl.load(X - d[None, :] + dp[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        if NORM:  # as RMSNorm.forward: normalised in float32, rounded to the model dtype, times the weight
            rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
            x = ((x * rstd).to(dtype).to(tl.float32) * tl.load(NW + d).to(tl.float32)[None, :]).to(dtype)
            xp = ((xp * rstd).to(dtype).to(tl.float32) * tl.load(NW + dp).to(tl.float32)[None, :]).to(dtype)
            x, xp = x.to(tl.float32), xp.to(tl.float32)
        i = (d % (D // 2))[None, :]
        cos = tl.load(R + s[:, None] * D + i, mask=live[:, None], other=0.0)
        sin = tl.load(R + s[:, None] * D + D // 2 + i, mask=live[:, None], other=0.0)
        return (x * cos + tl.where(d < D // 2, -1.0, 1.0)[None, :] * xp * sin).to(dtype)

    @triton.jit
    def _attn_split_kernel(Q, K, V, Pos, Out, Part, Stat, R, QN, KN, sqb, sqh, sqs, skb, skh, skn, sob, sos, soh,
                           n_kv_heads, group, seqlen, split_len, eps,
                           BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr,
                           ONE_SPLIT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
                           QK_NORM: tl.constexpr, BS: tl.constexpr):
        if PDL:  # launched early (programmatic dependent launch, as the one-row kernel below): wait for the kernels
            tl.extra.cuda.gdc_wait()  # before, which wrote q and the cache, then let the next one launch
            tl.extra.cuda.gdc_launch_dependents()
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // n_kv_heads, bh % n_kv_heads
        rows = tl.arange(0, BM)  # row r: query head h * group + r // seqlen at query position r % seqlen
        head, s = h * group + rows // seqlen, rows % seqlen
        live = rows < group * seqlen
        d = tl.arange(0, D)
        start = split * split_len
        # Q is the q/k/v projection [B, S, (H + 2 Hkv) D]: rope (and q/k norms) here; the new keys and values are
        # written to the cache by the split whose range holds their position, which then reads them back
        sn = tl.arange(0, BS)
        pn = tl.load(Pos + sn, mask=sn < seqlen, other=-1).to(tl.int32)
        own = (sn < seqlen) & (pn >= start) & (pn < start + split_len)
        kv_new = Q + b * sqb + sn[:, None] * sqs + d[None, :]
        k_new = _rope(kv_new + (group * n_kv_heads + h) * sqh, own, R, sn, KN, eps, D, QK_NORM, K.dtype.element_ty)
        v_new = tl.load(kv_new + ((group + 1) * n_kv_heads + h) * sqh, mask=own[:, None], other=0.0)
        cache = b * skb + h * skh + pn[:, None] * skn + d[None, :]
        tl.store(K + cache, k_new, mask=own[:, None])
        tl.store(V + cache, v_new.to(V.dtype.element_ty), mask=own[:, None])
        tl.debug_barrier()  # this program's writes to the cache are visible to all its threads before the reads
        q = _rope(Q + b * sqb + head[:, None] * sqh + s[:, None] * sqs + d[None, :], live, R, s, QN, eps, D, QK_NORM,
                  K.dtype.element_ty)
        pos = tl.load(Pos + s, mask=live, other=-1).to(tl.int32)  # a row sees the keys at or before its position
        end = tl.minimum(start + split_len, tl.max(pos, 0) + 1)
        m = tl.full([BM], float("-inf"), tl.float32)
        l = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for n0 in range(start, end, BN):
            n = n0 + tl.arange(0, BN)
            kv_off = b * skb + h * skh + n[:, None] * skn + d[None, :]
            k = tl.load(K + kv_off, mask=(n < end)[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE
            qk = tl.where(n[None, :] <= pos[:, None], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
            p = tl.exp(qk - m_use[:, None])
            alpha = tl.exp(m - m_use)
            v = tl.load(V + kv_off, mask=(n < end)[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, 1)
            m = m_new
        if ONE_SPLIT:
            out = Out + b * sob + s[:, None] * sos + head[:, None] * soh + d[None, :]
            tl.store(out, (acc / l[:, None]).to(Out.dtype.element_ty), mask=live[:, None])
        else:  # partial results, combined by the kernel below
            at = bh * tl.num_programs(1) + split
            tl.store(Part + (at * BM + rows[:, None]) * D + d[None, :], acc)
            tl.store(Stat + (at * 2) * BM + rows, m)
            tl.store(Stat + (at * 2 + 1) * BM + rows, l)

    @triton.jit
    def _attn_combine_kernel(Part, Stat, Out, sob, sos, soh, n_kv_heads, group, seqlen, n_splits,
                             BM: tl.constexpr, NS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bh, r = tl.program_id(0), tl.program_id(1)
        sp = tl.arange(0, NS)
        at = bh * n_splits + sp
        m = tl.load(Stat + (at * 2) * BM + r, mask=sp < n_splits, other=float("-inf"))
        l = tl.load(Stat + (at * 2 + 1) * BM + r, mask=sp < n_splits, other=0.0)
        w = tl.exp(m - tl.max(m, 0))  # the first split always holds key 0, so the maximum is finite
        d = tl.arange(0, D)
        part = tl.load(Part + (at[:, None] * BM + r) * D + d[None, :], mask=(sp < n_splits)[:, None], other=0.0)
        y = tl.sum(part * w[:, None], 0) / tl.sum(l * w, 0)
        b, head, s = bh // n_kv_heads, (bh % n_kv_heads) * group + r // seqlen, r % seqlen
        tl.store(Out + b * sob + s * sos + head * soh + d, y.to(Out.dtype.element_ty))

    # An opaque custom op, not torch.library.triton_op: traced into by inductor, the decode step slowed down by about
    # a copy of each layer's KV cache (scripts/bench_notes.md, 2026-11-23, sixth session). It mutates the caches in
    # place (inductor keeps a mutating custom op on the module's buffers, no copy: scripts/bench_notes.md): rope, the
    # q/k norms (Qwen3) and the cache write are one op per layer between q/k/v and wo.
    @torch.library.custom_op("gptfast::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
    def decode_attention_rope(qkv: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                              n_head: int, q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None,
                              eps: float = 0.0) -> Tensor:
        """qkv: [B, S, (H + 2 Hkv) D] contiguous, rope: [S, 2, D / 2] (float32) at input_pos (increasing), k_cache
        and v_cache: [B' >= B, Hkv, T, D] -> [B, S, H, D]; the S new keys and values are written to the caches at
        input_pos."""
        bsz, seqlen, _ = qkv.shape
        n_kv_heads, cache_len, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        group = n_head // n_kv_heads
        out = qkv.new_empty(bsz, seqlen, n_head, head_dim)
        block_m, block_n = max(16, triton.next_power_of_2(group * seqlen)), 64
        # enough programs for two per SM over the cache's length; splits past the filled length return at once
        sms = sm_count(qkv.device)
        n_splits = max(1, min(triton.cdiv(cache_len, 128), triton.cdiv(2 * sms, bsz * n_kv_heads)))
        split_len = triton.cdiv(triton.cdiv(cache_len, n_splits), block_n) * block_n
        n_splits = triton.cdiv(cache_len, split_len)
        part = qkv.new_empty(bsz * n_kv_heads * n_splits * block_m * head_dim, dtype=torch.float32)
        stat = qkv.new_empty(bsz * n_kv_heads * n_splits * 2 * block_m, dtype=torch.float32)
        pdl = use_pdl(qkv.device)
        _attn_split_kernel[(bsz * n_kv_heads, n_splits)](
            qkv, k_cache, v_cache, input_pos, out, part, stat, rope, qkv if q_norm is None else q_norm,
            qkv if k_norm is None else k_norm, qkv.stride(0), head_dim, qkv.stride(1), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), out.stride(2), n_kv_heads, group,
            seqlen, split_len, eps,
            BM=block_m, BN=block_n, D=head_dim, SCALE=head_dim ** -0.5, ONE_SPLIT=n_splits == 1,
            PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", PDL=pdl, QK_NORM=q_norm is not None,
            BS=triton.next_power_of_2(seqlen), launch_pdl=pdl)
        if n_splits > 1:
            _attn_combine_kernel[(bsz * n_kv_heads, group * seqlen)](
                part, stat, out, out.stride(0), out.stride(1), out.stride(2), n_kv_heads, group, seqlen, n_splits,
                BM=block_m, NS=triton.next_power_of_2(n_splits), D=head_dim, PDL=pdl, launch_pdl=pdl)
        return out

    @decode_attention_rope.register_fake
    def _(qkv, rope, k_cache, v_cache, input_pos, n_head, q_norm=None, k_norm=None, eps=0.0):
        return qkv.new_empty(qkv.size(0), qkv.size(1), n_head, k_cache.size(3))
else:
    decode_attention_rope = None


def use_decode_attention_rope(qkv: Tensor, head_dim: int) -> bool:
    """Whether attention takes decode_attention_rope: on CUDA, up to 16 positions, a contiguous q/k/v projection."""
    return decode_attention_rope is not None and qkv.is_cuda and qkv.size(1) <= 16 and qkv.is_contiguous() and \
        head_dim >= 16 and head_dim & (head_dim - 1) == 0


# One row times a weight on CUDA (decode). Inductor writes a one-row product as a reduction and inlines the op
# before it into the weight loads, so silu-mul before w2 was computed again for every weight row: w2 ran at 1.6 TB/s
# in bf16 and 0.66 in int8 (scripts/bench_notes.md). This kernel is opaque to inductor and reads each row once:
# BLOCK_N rows per program, the input width in steps of BLOCK_K, a float32 accumulator summed at the end. Weights
# are float or int8 (then one scale per row; int8 becomes float by placing q + 128 in the low byte of 2**23's bits,
# one byte permute, and subtracting 2**23 + 128: the loop takes ~164 instructions per 32 weights per thread on sm_90
# against ~191 with a sign extension and an integer add, read from the SASS).
if triton is not None:
    _ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")  # the Triton interpreter runs no inline asm

    @triton.jit
    def _as_float(w):
        if w.dtype == tl.int8 and _ASM:  # per 4 codes one xor (q + 128), per code one byte permute: 2**23 + 128 + q
            f = tl.inline_asm_elementwise(
                "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B000000, 0x7650; "
                "prmt.b32 $1, t, 0x4B000000, 0x7651; prmt.b32 $2, t, 0x4B000000, 0x7652; "
                "prmt.b32 $3, t, 0x4B000000, 0x7653; }",
                "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
            return f - 8388736.0
        return w.to(tl.float32)

    @triton.jit
    def _silu(x):
        # x / (1 + 2 ** (-x log2(e))) by the approximate exp2 and reciprocal, subnormals flushed: ~6 instructions
        # per input against ~15 for x / (1 + exp(-x)) with its range checks (sm_90 SASS); H100, one row of int8 w2
        # with silu-mul folded in (four rows per program, 1024 columns, 4 warps): llama-2-7b 19.8 -> 18.3 us,
        # qwen2.5-7b 31.6 -> 28.3; the whole decode step did not move (0.005 ms) with this change alone
        if _ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .f32 e; mul.ftz.f32 e, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 e, e; add.ftz.f32 e, e, 0f3F800000; "
                "rcp.approx.ftz.f32 e, e; mul.ftz.f32 $0, $1, e; }", "=f,f", [x], dtype=tl.float32, is_pure=True,
                pack=1)
        return x / (1.0 + tl.exp(-x))

    @triton.jit
    def _weight_tile(W, rows, live, rk, K):
        # a [BLOCK_N, BLOCK_K] tile of weights (rows: the rows' offsets), read once, so evicted first from L2
        return tl.load(W + rows + rk[None, :], mask=live[:, None] & (rk < K)[None, :], other=0,
                       eviction_policy="evict_first")

    @triton.jit
    def _first_tile(W, N, K, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # this program's weight rows and their first tile; launched early (programmatic dependent launch), the tile
        # is read while the kernel before finishes, and everything that kernel wrote (x, the residual) after the wait
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rn < N
        rows = rn[:, None].to(tl.int64) * K
        rk = tl.arange(0, BLOCK_K)
        w = _weight_tile(W, rows, live, rk, K)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        return rn, live, rows, rk, w

    @triton.jit
    def _store_rows(Y, R, y, rm, rn, M, N, live, RESIDUAL: tl.constexpr):
        # y [BLOCK_M, BLOCK_N] (float32) plus the residual's rows where asked, stored in Y's dtype
        out = rm[:, None] * N + rn[None, :]
        live2 = (rm < M)[:, None] & live[None, :]
        if RESIDUAL:
            y += tl.load(R + out, mask=live2, other=0.0).to(tl.float32)
        tl.store(Y + out, y.to(Y.dtype.element_ty), mask=live2)

    @triton.jit
    def _gemv_x(X, G, K, rk, sq, NORM: tl.constexpr, GLU: tl.constexpr):
        # one row's inputs at columns rk in float32, and the running sum of squares
        x = tl.load(X + rk, mask=rk < K, other=0.0).to(tl.float32)
        if GLU:  # X holds gate then up (2K values): the input is silu(gate) * up
            x = _silu(x) * tl.load(X + K + rk, mask=rk < K, other=0.0).to(tl.float32)
        if NORM:  # RMSNorm with weight G: the sum of squares here, the scalar 1 / rms applied at the end
            sq += x * x
            x *= tl.load(G + rk, mask=rk < K, other=0.0).to(tl.float32)
        return x, sq

    @triton.jit
    def _gemv_step(X, G, K, rk, w, acc, sq, NORM: tl.constexpr, GLU: tl.constexpr):
        x, sq = _gemv_x(X, G, K, rk, sq, NORM, GLU)
        return acc + _as_float(w) * x[None, :], sq

    @triton.jit
    def _gemv_store(Y, S, B, R, rn, live, y, SCALED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
        # one row's outputs y (float32) at rn: scaled, biased, the residual added, stored in Y's dtype
        if SCALED:
            y *= tl.load(S + rn, mask=live, other=0.0)
        if BIAS:
            y += tl.load(B + rn, mask=live, other=0.0)
        if RESIDUAL:
            y += tl.load(R + rn, mask=live, other=0.0).to(tl.float32)
        tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=live)

    # The tile is tuned once per shape and flags and the choice kept on disk (Triton's cache): a process that starts
    # warm does not time 13 configurations per shape again, and every process uses the same tiles.
    @triton.autotune(configs=[triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                              for n, k, w, s in [(4, 512, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 256, 8, 4),
                                                 (16, 512, 8, 3), (32, 128, 4, 4), (8, 1024, 8, 2), (4, 1024, 4, 2),
                                                 (16, 1024, 8, 3), (32, 512, 8, 3), (8, 2048, 8, 3),
                                                 (4, 2048, 4, 3), (16, 512, 4, 4)]],
                     key=["N", "K", "SCALED", "BIAS", "NORM", "GLU"], cache_results=True)
    @triton.jit
    def _gemv_kernel(X, W, S, B, G, R, Y, N, K, eps, SCALED: tl.constexpr, BIAS: tl.constexpr, NORM: tl.constexpr,
                     GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        rn, live, rows, rk, w = _first_tile(W, N, K, PDL, BLOCK_N, BLOCK_K)
        acc, sq = tl.zeros([BLOCK_N, BLOCK_K], tl.float32), tl.zeros([BLOCK_K], tl.float32)
        acc, sq = _gemv_step(X, G, K, rk, w, acc, sq, NORM, GLU)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = _weight_tile(W, rows, live, rk, K)
            acc, sq = _gemv_step(X, G, K, rk, w, acc, sq, NORM, GLU)
        y = tl.sum(acc, 1)
        if NORM:
            y *= tl.rsqrt(tl.sum(sq, 0) / K + eps)
        _gemv_store(Y, S, B, R, rn, live, y, SCALED, BIAS, RESIDUAL)

    # int8, one row, inputs at least INT8_ROWS_MIN_K wide: four weight rows per program, each a [BLOCK_K] tensor of x's
    # shape, so that each thread holds the same 16 columns of all four and x is read once for them with no trip
    # through shared memory (the tile above moves x's slice to the tile's layout through shared memory every step),
    # and each row's 16 products are summed in the thread before joining its accumulator (one float32 per 16
    # weights: ~72 registers against 128 for the tile above, so more programs and loads in flight per SM). H100,
    # us per call against the tile above at its autotuned best: llama-2-7b gate+up 34.4 -> 32.1, qwen2.5-7b gate+up
    # 51.4 -> 47.9, its head 190.9 -> 177.6 (scripts/bench_notes.md, twenty-third session).
    @triton.jit
    def _int8_row(W, r, N, K, rk):
        return tl.load(W + r.to(tl.int64) * K + rk, mask=(rk < K) & (r < N), other=0, eviction_policy="evict_first")

    @triton.jit
    def _int8_rows(W, r, N, K, rk):
        return (_int8_row(W, r, N, K, rk), _int8_row(W, r + 1, N, K, rk), _int8_row(W, r + 2, N, K, rk),
                _int8_row(W, r + 3, N, K, rk))

    @triton.jit
    def _sum16(w, x, acc, BLOCK_K: tl.constexpr):  # a row's products summed in runs of 16 columns, one per thread
        return acc + tl.sum(tl.reshape(_as_float(w) * x, [BLOCK_K // 16, 16]), 1)

    @triton.jit
    def _int8_rows_step(X, G, K, rk, w0, w1, w2, w3, a0, a1, a2, a3, sq, NORM: tl.constexpr, GLU: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        x, sq = _gemv_x(X, G, K, rk, sq, NORM, GLU)
        return (_sum16(w0, x, a0, BLOCK_K), _sum16(w1, x, a1, BLOCK_K), _sum16(w2, x, a2, BLOCK_K),
                _sum16(w3, x, a3, BLOCK_K), sq)

    @triton.jit
    def _int8_store(Y, S, B, R, r, N, acc, rstd, BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
        _gemv_store(Y, S, B, R, r, r < N, tl.sum(acc, 0) * rstd, True, BIAS, RESIDUAL)

    @triton.jit
    def _int8_kernel(X, W, S, B, G, R, Y, N, K, eps, BIAS: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                     RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_K: tl.constexpr):
        r = tl.program_id(0) * 4
        rk = tl.arange(0, BLOCK_K)
        w0, w1, w2, w3 = _int8_rows(W, r, N, K, rk)
        if PDL:  # the first tile is read while the kernel before finishes; x after it has
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        a0 = tl.zeros([BLOCK_K // 16], tl.float32)
        sq = tl.zeros([BLOCK_K], tl.float32)
        a0, a1, a2, a3, sq = _int8_rows_step(X, G, K, rk, w0, w1, w2, w3, a0, a0, a0, a0, sq, NORM, GLU, BLOCK_K)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w0, w1, w2, w3 = _int8_rows(W, r, N, K, rk)
            a0, a1, a2, a3, sq = _int8_rows_step(X, G, K, rk, w0, w1, w2, w3, a0, a1, a2, a3, sq, NORM, GLU, BLOCK_K)
        rstd = tl.rsqrt(tl.sum(sq, 0) / K + eps) if NORM else 1.0
        _int8_store(Y, S, B, R, r, N, a0, rstd, BIAS, RESIDUAL)
        _int8_store(Y, S, B, R, r + 1, N, a1, rstd, BIAS, RESIDUAL)
        _int8_store(Y, S, B, R, r + 2, N, a2, rstd, BIAS, RESIDUAL)
        _int8_store(Y, S, B, R, r + 3, N, a3, rstd, BIAS, RESIDUAL)

    # Two rows (the speculative draft's two-token step, a batch of 2, a 2-token prompt): each weight tile is read once
    # for both rows and each product is a float32 multiply-add, as above, per row; the tile is chosen so that the
    # accumulator holds 16-64 floats per thread. The multiply-adds bound it: on H100 two rows cost 1.15-1.4x one row,
    # about cuBLAS's time for the products alone, so the fused norms and adds make the block faster (qwen2.5-0.5b
    # two-token step 1.06 -> 0.83 ms); four rows cost 1.5-2x cuBLAS on 7B shapes (scripts/bench_notes.md), so more
    # than MAX_ROWS rows take F.linear. BLOCK_M pads the rows to a power of two.
    @triton.jit
    def _rows_step(X, G, sx, K, rm, rk, w, acc, sq, M, NORM: tl.constexpr, GLU: tl.constexpr):
        live = (rm < M)[:, None] & (rk < K)[None, :]
        xp = X + rm[:, None] * sx + rk[None, :]
        x = tl.load(xp, mask=live, other=0.0).to(tl.float32)
        if GLU:
            x = _silu(x) * tl.load(xp + K, mask=live, other=0.0).to(tl.float32)
        if NORM:
            sq += tl.sum(x * x, 1)
            x *= tl.load(G + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        return acc + _as_float(w)[None, :, :] * x[:, None, :], sq

    def _rows_configs(configs, named_args, **kwargs):
        per_thread = [kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] / (32 * c.num_warps)
                      for c in configs]
        return [c for c, r in zip(configs, per_thread) if 16 <= r <= 64]

    @triton.autotune(configs=[triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=3)
                              for n in (2, 4, 8, 16) for k in (128, 256, 512, 1024, 2048) for w in (4, 8)],
                     key=["M", "N", "K", "SCALED", "BIAS", "NORM", "GLU"], cache_results=True,
                     prune_configs_by=dict(early_config_prune=_rows_configs))
    @triton.jit
    def _rows_kernel(X, W, S, B, G, R, Y, M, N, K, sx, eps, SCALED: tl.constexpr, BIAS: tl.constexpr,
                     NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn, live, rows, rk, w = _first_tile(W, N, K, PDL, BLOCK_N, BLOCK_K)
        rm = tl.arange(0, BLOCK_M)
        acc, sq = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32), tl.zeros([BLOCK_M], tl.float32)
        acc, sq = _rows_step(X, G, sx, K, rm, rk, w, acc, sq, M, NORM, GLU)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = _weight_tile(W, rows, live, rk, K)
            acc, sq = _rows_step(X, G, sx, K, rm, rk, w, acc, sq, M, NORM, GLU)
        y = tl.sum(acc, 2)
        if NORM:
            y *= tl.rsqrt(sq / K + eps)[:, None]
        if SCALED:
            y *= tl.load(S + rn, mask=live, other=0.0)[None, :]
        if BIAS:
            y += tl.load(B + rn, mask=live, other=0.0)[None, :]
        _store_rows(Y, R, y, rm, rn, M, N, live, RESIDUAL)

    # Up to DOT_ROWS rows of float or int8 weights (the speculative verify's k + 1, a batch, a short prompt) on tensor
    # cores: the rows padded to 16 as one side of tl.dot, BLOCK_N weight rows the other, bfloat16 (or the weight's
    # dtype; int8 converted to x's) operands, a float32 accumulator, scales, bias and residual applied at the end.
    # The norms and silu-mul are not folded in: every program would redo them on its 16 x K inputs (H100, qwen2.5-7b,
    # 5 rows, best tile: w13 with the norm 117 us against 93 without, w2 with silu-mul 325 against 51;
    # scripts/bench_notes.md); inductor's kernels do them once.
    @triton.jit
    def _dot_step(X, sx, M, K, rm, rk, w, acc):
        x = tl.load(X + rm[:, None] * sx + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        if w.dtype == tl.int8:  # int8 codes are exact in x's dtype (bfloat16, float16 or float32); scaled at the end
            w = w.to(x.dtype)
        if w.dtype == tl.float32:  # float32 weights (tests, CPU-sized models) in full precision, not tf32
            return tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        return tl.dot(x.to(w.dtype), tl.trans(w), acc)

    @triton.autotune(configs=[triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                              for n, k, w, s in [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                                                 (32, 256, 8, 4), (64, 128, 4, 4), (64, 256, 8, 3)]],
                     key=["M", "N", "K", "SCALED", "BIAS"], cache_results=True)
    @triton.jit
    def _dot_rows_kernel(X, W, S, B, R, Y, M, N, K, sx, SCALED: tl.constexpr, BIAS: tl.constexpr,
                         RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        rn, live, rows, rk, w = _first_tile(W, N, K, PDL, BLOCK_N, BLOCK_K)
        rm = tl.arange(0, BLOCK_M)
        acc = _dot_step(X, sx, M, K, rm, rk, w, tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
        for k0 in range(BLOCK_K, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            w = _weight_tile(W, rows, live, rk, K)
            acc = _dot_step(X, sx, M, K, rm, rk, w, acc)
        if SCALED:
            acc *= tl.load(S + rn, mask=live, other=0.0)[None, :]
        if BIAS:
            acc += tl.load(B + rn, mask=live, other=0.0).to(tl.float32)[None, :]
        _store_rows(Y, R, acc, rm, rn, M, N, live, RESIDUAL)

    def _gemv_dtype(x: Tensor, scales: Optional[Tensor], residual: Optional[Tensor] = None) -> torch.dtype:
        dtype = x.dtype if scales is None else torch.promote_types(x.dtype, scales.dtype)
        return dtype if residual is None else torch.promote_types(dtype, residual.dtype)

    @torch.library.custom_op("gptfast::gemv", mutates_args=())
    def gemv(x: Tensor, w: Tensor, scales: Optional[Tensor] = None, bias: Optional[Tensor] = None,
             norm_weight: Optional[Tensor] = None, eps: float = 0.0, residual: Optional[Tensor] = None,
             glu: bool = False) -> Tensor:
        """x [M, K] (up to DOT_ROWS rows), w [N, K] contiguous, float or int8 with scales [N], bias [N] -> x w^T *
        scales + bias [M, N], in x's dtype promoted with the scales' (and the residual's); residual [M, N] is added
        at the end. Folded in where gemv_folds(M, w) (one row, the two-row kernel): glu, x [M, 2K] is gate and up
        and the input is silu(gate) * up; norm_weight, the input is RMSNorm(x) with that weight and eps."""
        (m, _), (n, k) = x.shape, w.shape
        y = x.new_empty(m, n, dtype=_gemv_dtype(x, scales, residual))
        pdl = use_pdl(x.device)
        b, r = w if bias is None else bias, w if residual is None else residual.contiguous()  # unused: any pointer
        operands = (w if scales is None else scales, b, w if norm_weight is None else norm_weight, r, y)
        flags = dict(SCALED=scales is not None, BIAS=bias is not None, NORM=norm_weight is not None, GLU=glu,
                     RESIDUAL=residual is not None, PDL=pdl, launch_pdl=pdl)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        if m == 1 and w.dtype == torch.int8 and scales is not None and k >= INT8_ROWS_MIN_K:
            bk, warps = int8_tile(n, k, sm_count(x.device))
            _int8_kernel[(triton.cdiv(n, 4),)](x, w, *operands, n, k, eps, BIAS=bias is not None,
                                               NORM=norm_weight is not None, GLU=glu, RESIDUAL=residual is not None,
                                               PDL=pdl, BLOCK_K=bk, num_warps=warps, launch_pdl=pdl)
        elif m == 1:
            _gemv_kernel[grid](x, w, *operands, n, k, eps, **flags)
        elif gemv_folds(m, w):
            _rows_kernel[grid](x, w, *operands, m, n, k, x.stride(0), eps, BLOCK_M=triton.next_power_of_2(m),
                               **flags)
        else:
            assert m <= DOT_ROWS and norm_weight is None and not glu, \
                f"model.gemv takes up to {DOT_ROWS} rows here, norm and silu-mul not folded in"
            _dot_rows_kernel[grid](x, w, operands[0], b, r, y, m, n, k, x.stride(0), SCALED=scales is not None,
                                   BIAS=bias is not None, RESIDUAL=residual is not None, PDL=pdl, launch_pdl=pdl,
                                   BLOCK_M=16)
        return y

    @gemv.register_fake
    def _(x, w, scales=None, bias=None, norm_weight=None, eps=0.0, residual=None, glu=False):
        return x.new_empty(x.size(0), w.size(0), dtype=_gemv_dtype(x, scales, residual))
else:
    gemv = None


# The int8 kernel of four rows per program serves inputs at least this wide; narrower ones (qwen2.5-0.5b's 896) were
# faster with the tiles above (gate+up 4.9 against 6.0 us on H100)
INT8_ROWS_MIN_K = 2048


def int8_tile(n: int, k: int, sms: int) -> tuple:
    """(BLOCK_K, warps) of the int8 four-row kernel for n x k weights: 16 columns per thread; 1 warp where the
    programs (n / 4) number at least 64 per SM (sms SMs), 2 from 16, else 4, or 8 for inputs over 8192 wide (H100
    micro-benchmark, scripts/bench_notes.md, twenty-third session)."""
    per_sm = n / 4 / sms
    warps = 1 if per_sm >= 64 else 2 if per_sm >= 16 else 4 if k <= 8192 else 8
    return 16 * 32 * warps, warps


MAX_ROWS = 2
# Two rows only for narrow models: the smaller side of a block's matrices is the model width. On H100 two rows
# through the four-call block were faster for qwen2.5-0.5b (width 896; the draft's two-token step 1.06 -> 0.83 ms)
# and slower for llama-2-7b (width 4096; batch-2 decode 5.56 -> 5.71 ms); widths in between are not measured.
ROWS_MAX_WIDTH = 2048
# Up to DOT_ROWS rows of a float weight take the tensor-core kernel (wider models' two rows, the verify's k + 1)
DOT_ROWS = 16


def gemv_folds(rows: int, w: Tensor) -> bool:
    """Whether model.gemv folds the norm and silu-mul in for this many rows of w (one row, or the two-row kernel on
    a narrow model) rather than taking the tensor-core kernel, which leaves them to the caller."""
    return rows == 1 or (rows <= MAX_ROWS and min(w.shape) <= ROWS_MAX_WIDTH)


def use_gemv(x: Tensor, w: Tensor) -> bool:
    """Whether x times w goes to the kernels above, on CUDA with a contiguous 2D weight: one row of an int8 weight
    (F.linear would need a float copy of it), and under torch.compile up to DOT_ROWS rows of a float or int8 weight
    (the two-row kernel for up to MAX_ROWS on models up to ROWS_MAX_WIDTH wide, tensor cores otherwise; inductor's
    own code for two rows of int8, the cast fused into the product, took 63 ms per qwen2.5-7b step). Float weights
    stay with F.linear in eager mode: there a gemv call costs ~66-97 us of host time against F.linear's 18 on the
    H100 machine (eager decode, qwen2.5-0.5b bf16: 28.7 / 26.5 -> 22.3 / 21.4 ms per token without it, llama-2-7b
    29.4 -> 27.6; a short prompt's eager prefill, llama-2-7b, batch 2: first token 31-55 ms against 24-34)."""
    rows = x.numel() // x.size(-1)
    if gemv is None or not x.is_cuda or w.dim() != 2 or not w.is_contiguous():
        return False
    if rows == 1 and not w.is_floating_point():
        return True
    return rows <= DOT_ROWS and torch.compiler.is_compiling()


class GemvLinear(nn.Linear):
    """nn.Linear whose product of up to DOT_ROWS rows on CUDA is model.gemv, where a block does not run as four
    kernel calls (TransformerBlock.few_rows: under tp.py's hooks, in int4 files): the down-projection w2, whose input
    (silu-mul) inductor would otherwise recompute per weight row (H100, llama-2-7b bf16: 5.51 -> 5.22 ms per token),
    and q/k/v with a bias (qwen2.5-0.5b: 1.03 -> 0.86 ms). The other float layers stay with inductor there."""

    def forward(self, x: Tensor) -> Tensor:
        if use_gemv(x, self.weight):
            return gemv(x.reshape(-1, x.size(-1)).contiguous(), self.weight, None, self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        total_head_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        # with a bias (Qwen 1-2.5) inductor leaves the product to cuBLAS and the norm unfused; the kernel is faster
        self.wqkv = (GemvLinear if config.qkv_bias else nn.Linear)(config.dim, total_head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        return self.wo(self.attend(self.wqkv(x), rope, mask, input_pos))

    def attend(self, qkv: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """The projected q, k, v [B, S, (H + 2 Hkv) D] -> attention's output before wo [B, S, H D]."""
        bsz, seqlen, _ = qkv.shape
        # sizes are read off the module so that tp.py can shard heads without touching this file
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        if self.kv_cache is not None and use_decode_attention_rope(qkv, self.head_dim):
            norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if hasattr(self, "q_norm") else ()
            y = decode_attention_rope(qkv, rope.contiguous(), self.kv_cache.k_cache, self.kv_cache.v_cache,
                                      input_pos, self.n_head, *norms)
            return y.view(bsz, seqlen, q_size)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                           enable_gqa=self.n_head != self.n_local_heads).transpose(1, 2)
        return y.contiguous().view(bsz, seqlen, self.n_head * self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = GemvLinear(config.intermediate_size, config.dim, bias=False)  # down
        self.w13: Optional[nn.Module] = None  # gate and up as one matrix, set by merge_gate_up below

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        if self.few_rows(x):
            return self.forward_few_rows(x, rope, mask, input_pos)
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def few_rows(self, x: Tensor) -> bool:
        """On CUDA, one row (every product an int8 or float matrix) or up to DOT_ROWS rows of such matrices where
        use_gemv allows them, gate and up merged, no hooks (tp.py's all-reduce after wo and w2)."""
        a, f = self.attention, self.feed_forward
        return f.w13 is not None and \
            all(_row_operands(m) is not None and use_gemv(x, m.weight) for m in (a.wqkv, a.wo, f.w13, f.w2))

    def forward_few_rows(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        """The block in four calls of model.gemv, with both RMSNorms, silu-mul and both residual adds folded into
        them: the separate add + norm and silu-mul kernels (~7 us per layer on H100) go. Rows on tensor cores keep
        the residual adds folded in and leave the norms and silu-mul to inductor."""
        a, f = self.attention, self.feed_forward
        rows = x.reshape(-1, x.size(-1))
        fold = all(gemv_folds(rows.size(0), m.weight) for m in (a.wqkv, a.wo, f.w13, f.w2))
        qkv = _gemv_rows(a.wqkv, rows, norm=self.attention_norm) if fold else \
            _gemv_rows(a.wqkv, self.attention_norm(rows))
        y = a.attend(qkv.view(*x.shape[:-1], -1), rope, mask, input_pos)
        h = _gemv_rows(a.wo, y.reshape(rows.size(0), -1), residual=rows)
        if fold:
            return _gemv_rows(f.w2, _gemv_rows(f.w13, h, norm=self.ffn_norm), residual=h, glu=True).view(*x.shape)
        gate, up = _gemv_rows(f.w13, self.ffn_norm(h)).chunk(2, dim=-1)
        return _gemv_rows(f.w2, F.silu(gate) * up, residual=h).view(*x.shape)


def _row_operands(m: nn.Module) -> Optional[tuple]:
    """(weight, scales, bias) of a linear layer whose weight is a plain [out, in] matrix, float or int8 with one
    scale per row (quantize.WeightOnlyInt8Linear), and that has no hooks; else None (int4's packed layouts)."""
    w = getattr(m, "weight", None)
    if not (isinstance(w, Tensor) and w.dim() == 2 and w.is_contiguous()) or m._forward_hooks or \
            m._forward_pre_hooks:
        return None
    if w.dtype == torch.int8:
        return w, m.scales, m.bias
    return (w, None, m.bias) if w.is_floating_point() and isinstance(m, nn.Linear) else None


def _gemv_rows(m: nn.Module, x: Tensor, norm: Optional[RMSNorm] = None, residual: Optional[Tensor] = None,
               glu: bool = False) -> Tensor:
    w, scales, bias = _row_operands(m)
    return gemv(x.contiguous(), w, scales, bias, None if norm is None else norm.weight,
                0.0 if norm is None else norm.eps, residual, glu)


def merge_gate_up(model: nn.Module) -> nn.Module:
    """Gate and up of each feed-forward block as one matrix (FeedForward.w13, the layer w1 grown by w3's rows), where
    both are layers of one kind holding only a weight [out, in] and maybe per-row scales (float, int8) or per-group
    scales and zeros (int4 before packing), no bias and no hooks: one product per layer instead of two, and each
    one-row product costs ~4 us besides its reads on H100 (scripts/bench_notes.md). Call after tp.py's split."""
    out_dim = {"weight": 0, "scales": 0, "scales_and_zeros": 1}  # int4's pairs are [groups, out, 2]

    def rows(m: nn.Module) -> Optional[list]:
        ts = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        w = getattr(m, "weight", None)
        ok = isinstance(w, Tensor) and w.dim() == 2 and {n for n, _ in ts} <= set(out_dim) and \
            all(t.size(out_dim[n]) == w.size(0) for n, t in ts) and not m._forward_hooks and not m._forward_pre_hooks
        return ts if ok else None

    for f in [m for m in model.modules() if isinstance(m, FeedForward) and m.w13 is None]:
        w1, w3 = f.w1, f.w3
        if type(w1) is not type(w3) or rows(w1) is None or rows(w3) is None or \
                getattr(w1, "groupsize", None) != getattr(w3, "groupsize", None):
            continue
        for name, t in rows(w1):
            merged = torch.cat([t, getattr(w3, name)], dim=out_dim[name])
            setattr(w1, name, nn.Parameter(merged, t.requires_grad) if isinstance(t, nn.Parameter) else merged)
        w1.out_features += w3.out_features
        f.w13, f.w1, f.w3 = w1, None, None
    return model


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope: Optional[Tensor] = None
        self.causal_mask: Optional[Tensor] = None
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        max_seq_length = find_multiple(max_seq_length, 8)
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        for b in self.layers:
            b.attention.kv_cache = KVCache(max_batch_size, max_seq_length, b.attention.n_local_heads,
                                           b.attention.head_dim, dtype).to(device)
        self.rope = precompute_rope(max_seq_length, self.config.head_dim, self.config.rope_base,
                                    self.config.rope_scaling).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))

    def forward(self, idx: Tensor, input_pos: Tensor, last_only: bool = False) -> Tensor:
        # idx: [B, S] token ids at positions input_pos: [S]. Returns logits [B, S, vocab] (or [B, 1, vocab]).
        assert self.rope is not None, "call setup_caches first"
        mask = self.causal_mask[None, None, input_pos]
        rope = self.rope[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        if x.numel() == x.size(-1) and _row_operands(self.output) is not None and use_gemv(x, self.output.weight):
            # one row on CUDA: the final norm folded into the head's product. Inductor's fused norm + head took 84 or
            # 184 us for qwen2.5-0.5b's 151936x896 head on H100, as its tuning fell in each process
            return _gemv_rows(self.output, x.view(1, -1), norm=self.norm).view(*x.shape[:-1], -1).float()
        return self.output(self.norm(x)).float()
