# Run by tests/test_model.py with TRITON_INTERPRET=1: model.gemv and quantize's int4 product on CPU tensors, their
# Triton kernels executed by Triton's interpreter (the plain-Triton paths, not the inline PTX), against float64.
# Prints one line per case and exits 1 if any is off.
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model  # noqa: E402
import quantize  # noqa: E402
from conftest import gemv_float64  # noqa: E402  (this folder is on the path: the script's own)

model.sm_count = quantize.sm_count = lambda device: 132  # the launches size their tiles for an H100
# the autotuned kernels get one tile each (the interpreter cannot time them), with partial last blocks here
for kernel, (bn, bk) in ((model._gemv_kernel, (8, 256)), (model._rows_kernel, (4, 256)),
                         (model._dot_rows_kernel, (16, 256))):
    kernel.configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=4)]
g = torch.Generator().manual_seed(0)
failed = []


def check(name, got, want, tol):
    err = ((got.double() - want).norm() / want.norm()).item()
    print(f"{'ok ' if err < tol else 'BAD'} {name}: {err:.1e}", flush=True)
    if not err < tol:
        failed.append(name)


# (rows, out, in): one row of int8 at least INT8_ROWS_MIN_K wide takes the four-row kernel, narrower the tiled one;
# two rows of a narrow matrix the two-row kernel, five rows the tensor-core kernel (norm and silu-mul not folded)
for m, n, k in [(1, 10, 2100), (1, 37, 300), (2, 37, 300), (5, 37, 300)]:
    for wdtype in (torch.int8, torch.float32):
        if wdtype == torch.int8:
            w, s = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 256
        else:
            w, s = torch.randn(n, k, generator=g) / 16, None
        fold = model.gemv_folds(m, w)
        for fused in (False, True):
            x = torch.randn(m, 2 * k if fused and fold else k, generator=g)
            b, r = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
            nw = torch.rand(k, generator=g) + 0.5
            args = (x, w, s, b if fused else None, nw if fused and fold else None, 1e-6, r if fused else None,
                    fused and fold)
            check(f"gemv {m}x{n}x{k} {wdtype} {'fused' if fused else 'plain'}", model.gemv(*args),
                  gemv_float64(*args).double(), 1e-5)

# int4: one and two rows (x in planes), five rows (tensor cores, K split); N not a multiple of 4
for m in (1, 2, 5):
    for gs in (32, 128):
        n, k = 10, 1024
        codes = torch.randint(0, 16, (n, k), generator=g)
        scale, zero = torch.rand(k // gs, n, generator=g) / 64 + 1 / 256, torch.randn(k // gs, n, generator=g) / 128
        sz = torch.stack([scale, zero], -1).to(torch.bfloat16)
        words, packed = quantize.pack_words(codes), quantize.pack_scales(sz)
        x16 = torch.randn(m, k, generator=g).to(torch.float16)
        got = quantize._int4_mm(quantize.int4_planes(x16) if m <= 2 else x16, words, packed)
        want = x16.double() @ quantize.dequantize_words(words, packed, gs).double().T
        check(f"int4 {m}x{n}x{k} g{gs}", got, want, 1e-5)  # against the same float16 weights and x

# a whole small model's prefill and decode steps on the kernels (decode attention with rope, q/k norms and the cache
# write; the block as four gemv calls; the head with the final norm folded in) against the same model in PyTorch ops
torch.manual_seed(0)
for name, cfg in (("gqa", dict()), ("qwen3", dict(qk_norm=True, head_dim=32)), ("qwen2", dict(qkv_bias=True))):
    args = model.ModelArgs(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_local_heads=2, dim=64,
                           intermediate_size=96, **cfg)
    net = model.merge_gate_up(model.Transformer(args))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape) / 8 + (1 if p.dim() == 1 else 0))  # norms near 1, biases too: any values
    ids = torch.randint(0, args.vocab_size, (1, 12), generator=g)
    logits = {}
    for kernels in (False, True):
        use_gemv, use_attention = model.use_gemv, model.use_decode_attention_rope
        if kernels:  # on CPU these say no: the Triton paths taken as on CUDA under torch.compile
            model.use_gemv = lambda x, w: w.dim() == 2 and w.is_contiguous() and x.numel() // x.size(-1) <= 16
            model.use_decode_attention_rope = lambda qkv, head_dim: qkv.size(1) <= 16
        net.setup_caches(1, 64)
        for b in net.layers:
            b.attention.kv_cache.k_cache.zero_()
            b.attention.kv_cache.v_cache.zero_()
        with torch.no_grad():  # a 5-token prompt (the few-row paths), then one token per step
            out = [net(ids[:, :5], torch.arange(5))]
            out += [net(ids[:, i:i + 1], torch.tensor([i])) for i in range(5, 12)]
        logits[kernels] = torch.cat(out, dim=1)
        model.use_gemv, model.use_decode_attention_rope = use_gemv, use_attention
    check(f"model {name}", logits[True], logits[False].double(), 1e-5)

sys.exit(1 if failed else 0)
