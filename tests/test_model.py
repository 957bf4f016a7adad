# model.py and the HF converter against transformers, in float32, for every architecture variant.
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

import model as model_module
from generate import generate, load_model
from conftest import ROOT, compile_for_sm90


def load(ckpt_dir):
    model = load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    return model


def test_prefill_and_cached_decode_logits_match(variant):
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(2, 32)
        n_prefill = 7
        out = model(ids[:, :n_prefill], torch.arange(n_prefill))
        steps = [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(n_prefill, ids.size(1))]
    got = torch.cat([out] + steps, dim=1)
    assert ref.abs().max() > 1.0, "logits too small to tell tokens apart"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def decode_attention_rope_float64(qkv, rope, k_cache, v_cache, input_pos, n_head, q_norm=None, k_norm=None,
                                  eps=0.0):
    """model.decode_attention_rope's contract in float64 torch ops (its kernel runs on CUDA only)."""
    bsz, seqlen, _ = qkv.shape
    n_kv, d = k_cache.size(1), k_cache.size(3)
    q, k, v = (t.reshape(bsz, seqlen, -1, d) for t in qkv.double().split([n_head * d, n_kv * d, n_kv * d], -1))
    if q_norm is not None:
        q, k = ((t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.double()) for t, w in ((q, q_norm),
                                                                                                   (k, k_norm)))
    cos, sin = rope[None, :, None, 0].double(), rope[None, :, None, 1].double()
    q, k = (torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1) for t1, t2 in (q.chunk(2, -1), k.chunk(2, -1)))
    k_cache[:bsz, :, input_pos] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[:bsz, :, input_pos] = v.transpose(1, 2).to(v_cache.dtype)
    mask = torch.arange(k_cache.size(2)) <= input_pos[:, None]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:bsz].double(), v_cache[:bsz].double(),
                                       attn_mask=mask, enable_gqa=n_head != n_kv)
    return y.transpose(1, 2).to(qkv.dtype)


def test_fused_attention_wiring_matches_transformers(variant, monkeypatch):
    # On CUDA, up to 16 positions take decode_attention_rope (rope, q/k norms and the cache write folded into
    # decode attention). Here its contract in float64 stands in for the kernel, so that what attention hands it
    # (which norm weight, the rope rows, the caches, the head count) is checked on CPU against transformers.
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    calls = []
    monkeypatch.setattr(model_module, "use_decode_attention_rope", lambda qkv, head_dim: True)
    monkeypatch.setattr(model_module, "decode_attention_rope",
                        lambda *a: calls.append(1) or decode_attention_rope_float64(*a))
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(2, 32)
        out = model(ids[:, :7], torch.arange(7))
        steps = [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(7, 12)]
    assert len(calls) == 6 * model.config.n_layer
    torch.testing.assert_close(torch.cat([out] + steps, dim=1), ref, atol=1e-4, rtol=0)


def test_greedy_tokens_match(variant):
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    prompt = torch.tensor([3, 17, 42, 7, 99], dtype=torch.int)
    with torch.no_grad():
        ref = hf.generate(prompt[None].long(), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0)[0].tolist()
        model.setup_caches(1, 32)
        y, _ = generate(model, prompt, 20, temperature=0)
    assert y[0].tolist() == ref


def test_config_matches_hf(variant):
    name, hf, ckpt_dir = variant
    model = load(ckpt_dir)
    c = hf.config
    assert model.config.n_layer == c.num_hidden_layers
    assert model.config.vocab_size == c.vocab_size
    assert model.config.tie_word_embeddings == bool(c.tie_word_embeddings)
    assert model.config.qkv_bias == (name in ("qwen1", "qwen2", "qwen2_tied"))
    assert model.config.qk_norm == (name == "qwen3")
    if name == "llama3":
        assert model.config.rope_scaling["factor"] == 8.0


# On a GPU the decode steps (and prompts of up to 16 tokens) take model.py's Triton decode attention instead of SDPA:
# the same comparisons with transformers on the CPU, then the kernel alone against SDPA where the cache is long.
cuda = pytest.mark.skipif(not torch.cuda.is_available() or model_module.decode_attention_rope is None,
                          reason="needs a CUDA GPU and Triton")


@cuda
@pytest.mark.parametrize("bsz", [1, 2])  # forward_few_rows: one token per sequence (1 or 2 rows)
def test_gpu_logits_match_transformers(variant, bsz):
    name, hf, ckpt_dir = variant
    model = load_model(ckpt_dir / "model.pth", "cuda", torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (bsz, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(bsz, 32)
        x, n_prefill = ids.cuda(), 7
        out = model(x[:, :n_prefill], torch.arange(n_prefill, device="cuda"))
        steps = [model(x[:, i:i + 1], torch.tensor([i], device="cuda")) for i in range(n_prefill, ids.size(1))]
    got = torch.cat([out] + steps, dim=1).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@cuda
@pytest.mark.parametrize("bsz", [1, 2])
def test_gpu_compiled_logits_match_transformers(variant, bsz, monkeypatch):
    # under torch.compile float weights take model.gemv (eager mode keeps F.linear): one row through the block's four
    # calls with the norms folded in, two rows through the two-row kernel on these narrow models, and a five-token
    # step (a speculative verify) on tensor cores
    name, hf, ckpt_dir = variant
    if name not in ("qwen2", "llama2", "qwen3"):  # biases, one query head per key head, q/k norms: compiles are slow
        pytest.skip("compiled on three variants only")
    torch._dynamo.reset()  # each case compiles two shapes: past dynamo's recompile limit the model would run eagerly
    launches = {}

    class Counted:  # counts a Triton kernel's launches (kernel[grid](...))
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches[self.name] = launches.get(self.name, 0) + 1
            return self.kernel[grid]
    for kernel in ("_gemv_kernel", "_rows_kernel", "_dot_rows_kernel"):
        monkeypatch.setattr(model_module, kernel, Counted(kernel, getattr(model_module, kernel)))
    model = load_model(ckpt_dir / "model.pth", "cuda", torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (bsz, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        model.setup_caches(bsz, 32)
        step = torch.compile(model, fullgraph=True, dynamic=False)
        x, n_prefill = ids.cuda(), 7
        out = [model(x[:, :n_prefill], torch.arange(n_prefill, device="cuda"))]
        out += [step(x[:, i:i + 1], torch.tensor([i], device="cuda")) for i in range(n_prefill, 12)]
        out.append(step(x[:, 12:], torch.arange(12, 17, device="cuda")))
    got = torch.cat(out, dim=1).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert launches.get("_gemv_kernel" if bsz == 1 else "_rows_kernel") and launches.get("_dot_rows_kernel"), launches


@cuda
def test_gpu_compiled_greedy_tokens_match_transformers(variant):
    import generate as G
    name, hf, ckpt_dir = variant
    if name not in ("qwen2", "llama2"):  # one GQA and one MHA model: each compile takes a while
        pytest.skip("compiled on two variants only")
    model = load_model(ckpt_dir / "model.pth", "cuda", torch.float32)
    prompt = torch.tensor([3, 17, 42, 7, 99], dtype=torch.int)
    with torch.no_grad():
        ref = hf.generate(prompt[None].long(), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                          pad_token_id=0)[0].tolist()
        model.setup_caches(1, 600)  # a cache longer than the text: several splits, most of them empty
        eager_decode = G.decode_one_token
        G.decode_one_token = torch.compile(eager_decode, mode="reduce-overhead", fullgraph=True)
        try:
            y, _ = generate(model, prompt.cuda(), 30, temperature=0)
        finally:
            G.decode_one_token = eager_decode
    assert y[0].tolist() == ref


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("bsz,n_head,n_kv,head_dim,seqlen,cache_len,last", [
    (1, 32, 32, 128, 1, 208, 100), (1, 28, 4, 128, 1, 8400, 8300), (2, 14, 2, 64, 1, 1000, 0),
    (1, 14, 2, 64, 5, 1000, 999), (1, 16, 8, 128, 5, 8192, 4097), (2, 32, 8, 128, 5, 4096, 3000),
    (1, 9, 3, 64, 16, 8192, 70)])
def test_decode_attention_rope_matches_the_unfused_steps(dtype, qk_norm, bsz, n_head, n_kv, head_dim, seqlen,
                                                         cache_len, last):
    # decode_attention_rope (q/k norms, rope and the cache write folded into decode attention) against the steps of
    # Attention.attend done separately; the new keys may straddle two of the kernel's cache splits
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(bsz, seqlen, (n_head + 2 * n_kv) * head_dim, device="cuda", generator=g).to(dtype)
    k_cache, v_cache = (torch.randn(bsz + 1, n_kv, cache_len, head_dim, device="cuda", generator=g).to(dtype)
                        for _ in range(2))
    pos = torch.arange(last - seqlen + 1, last + 1, device="cuda")
    rope = model_module.precompute_rope(cache_len, head_dim, 10000.0).cuda()[pos]
    norms = [torch.rand(head_dim, device="cuda", generator=g).to(dtype) + 0.5 for _ in range(2)] if qk_norm else []
    q, k, v = qkv.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
    q = q.view(bsz, seqlen, n_head, head_dim)
    k, v = k.view(bsz, seqlen, n_kv, head_dim), v.view(bsz, seqlen, n_kv, head_dim)
    if qk_norm:
        q_norm, k_norm = model_module.RMSNorm(head_dim, 1e-6).cuda(), model_module.RMSNorm(head_dim, 1e-6).cuda()
        q_norm.weight.data, k_norm.weight.data = norms[0].clone(), norms[1].clone()
        q, k = q_norm(q), k_norm(k)
    q, k = model_module.apply_rotary_emb(q, rope), model_module.apply_rotary_emb(k, rope)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    k_want[:bsz, :, pos], v_want[:bsz, :, pos] = k.transpose(1, 2), v.transpose(1, 2)
    mask = torch.ones(cache_len, cache_len, dtype=torch.bool, device="cuda").tril()[pos]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).double(), k_want[:bsz].double(), v_want[:bsz].double(),
                                         attn_mask=mask, enable_gqa=n_head != n_kv).transpose(1, 2)
    got = model_module.decode_attention_rope(qkv, rope, k_cache, v_cache, pos, n_head, *norms,
                                             *([1e-6] if qk_norm else []))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.equal(v_cache, v_want)  # values are copied as they are; keys may differ by one rounding
    torch.testing.assert_close(k_cache.double(), k_want.double(), atol=tol, rtol=0)
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=0)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@cuda
@pytest.mark.parametrize("n,k", [(37, 300), (5, 2049), (1152, 896), (4096, 11008)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_gpu_gemv_matches_float64(n, k, wdtype, m):
    # model.gemv, the product of decode's few rows (the block's four calls, w2 and biased q/k/v elsewhere, every int8
    # layer), with and without bias
    g = torch.Generator().manual_seed(n + k)
    if wdtype == torch.int8:
        w, s = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), (torch.rand(n, generator=g) + .5) / 512
    else:
        w, s = torch.randn(n, k, generator=g).to(wdtype) / 16, None
    xdtype = torch.float32 if wdtype == torch.float32 else torch.bfloat16
    x, bias = torch.randn(m, k, generator=g).to(xdtype), torch.randn(n, generator=g).to(xdtype)
    want = x.double() @ w.double().T * (1 if s is None else s.double())
    # float32 sums and outputs agree to float32 rounding; bfloat16 outputs are rounded to 2^-9
    tol = 1e-5 if xdtype == torch.float32 else 1e-2
    for b in (None, bias):
        got = model_module.gemv(x.cuda(), w.cuda(), None if s is None else s.cuda(), None if b is None else b.cuda())
        assert got.shape == (m, n) and got.dtype == (xdtype if s is None else torch.float32)
        assert rel_err(got.cpu(), want + (0 if b is None else b.double())) < tol
    # the folded-in steps of the block's four calls: silu-mul of gate and up, RMSNorm (where gemv folds them: one
    # row, the two-row kernel), the residual add (per row)
    fold = model_module.gemv_folds(m, w)
    xx, r = torch.randn(m, 2 * k if fold else k, generator=g).to(xdtype), torch.randn(m, n, generator=g)
    nw = torch.rand(k, generator=g) + 0.5
    v = torch.nn.functional.silu(xx[:, :k].double()) * xx[:, k:].double() if fold else xx.double()
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double() if fold else v
    want = (v @ w.double().T) * (1 if s is None else s.double()) + bias.double() + r.double()
    got = model_module.gemv(xx.cuda(), w.cuda(), None if s is None else s.cuda(), bias.cuda(),
                            nw.cuda() if fold else None, 1e-6, r.cuda(), fold)
    assert got.dtype == torch.float32 and rel_err(got.cpu(), want) < tol
    for i in range(m):  # each row on its own: a row's result does not depend on the others
        assert rel_err(got[i].cpu(), want[i]) < tol


needs_triton = pytest.mark.skipif(getattr(model_module, "triton", None) is None, reason="needs Triton")


@needs_triton
def test_kernels_match_float64_in_the_triton_interpreter():
    # model.gemv's kernels (one row of int8 on both one-row kernels, two rows, five rows on tensor cores; every folded
    # step) and quantize's int4 kernels, run on CPU tensors by Triton's interpreter against float64, and small models
    # (GQA, Qwen3's q/k norms, Qwen2's biases) decoding on the kernels (decode attention too) against PyTorch ops:
    # masks, folds, launch choices and the block's wiring without a GPU. The interpreter takes the plain-Triton
    # paths; the inline PTX is checked by the GPU tests.
    import numpy
    assert tuple(int(v) for v in numpy.__version__.split(".")[:2]) < (2, 4), \
        "Triton 3.6's interpreter fails on numpy 2.4: install requirements-test.txt (numpy<2.4)"
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "interpret_worker.py")], capture_output=True, text=True,
                         env=dict(os.environ, TRITON_INTERPRET="1"), timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("qk_norm,bm,bs", [(False, 16, 1), (True, 32, 8)])
def test_attention_kernels_compile_for_sm90(dtype, qk_norm, bm, bs):
    t = "*" + dtype
    pointers = dict(Q=t, K=t, V=t, Out=t, QN=t, KN=t, Pos="*i64", Part="*fp32", Stat="*fp32", R="*fp32")
    split = dict(BM=bm, BN=64, D=128, SCALE=128 ** -0.5, ONE_SPLIT=False, PRECISION="tf32", PDL=True,
                 QK_NORM=qk_norm, BS=bs)
    assert compile_for_sm90(model_module._attn_split_kernel, pointers, split).asm["ptx"]
    combine = dict(BM=bm, NS=4, D=128, PDL=True)
    assert compile_for_sm90(model_module._attn_combine_kernel, pointers, combine).asm["ptx"]


@needs_triton
@pytest.mark.parametrize("wdtype,xdtype", [("bf16", "bf16"), ("i8", "bf16"), ("i8", "fp32")])
@pytest.mark.parametrize("fused", [False, True])  # scale, bias, RMSNorm, silu-mul and residual folded in, or none
def test_gemv_kernels_compile_for_sm90(wdtype, xdtype, fused):
    x = "*" + xdtype
    pointers = dict(X=x, W="*" + wdtype, S="*fp32", B=x, G=x, R=x, Y=x)
    flags = dict(SCALED=fused and wdtype == "i8", BIAS=fused, NORM=fused, GLU=fused, RESIDUAL=fused, PDL=True)
    for kernel, extra in ((model_module._gemv_kernel, {}), (model_module._rows_kernel, dict(BLOCK_M=2)),
                          (model_module._dot_rows_kernel, dict(BLOCK_M=16))):
        # the smallest and largest tiles the kernel can run with (the rows kernel prunes its list per row count)
        rows = kernel is model_module._rows_kernel
        configs = model_module._rows_configs(kernel.configs, None, **extra) if rows else kernel.configs
        for config in (configs[0], configs[-1]):
            compiled = compile_for_sm90(kernel, pointers, dict(flags, **extra, **config.kwargs), config.num_warps)
            assert compiled.asm["ptx"]
    if wdtype == "i8":  # the int8 four-row kernel at the tiles gemv launches on an H100 (int8_tile: 1, 2, 4, 8 warps)
        int8_flags = {f: flags[f] for f in ("BIAS", "NORM", "GLU", "RESIDUAL", "PDL")}
        for n, k in ((151936, 3584), (22016, 4096), (4096, 4096), (3584, 18944)):
            block_k, warps = model_module.int8_tile(n, k, 132)
            compiled = compile_for_sm90(model_module._int8_kernel, pointers, dict(int8_flags, BLOCK_K=block_k), warps)
            assert compiled.asm["ptx"]
