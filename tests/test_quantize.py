# quantize.py: round-trip error bounds, the int4 kernels against the dequantize reference, quantized small random
# models against transformers and against their own dequantized weights, the real models' greedy text, the
# checkpoint's metadata, and the CLI's answers to bad input.
import hashlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate
import model as model_module
import quantize
from conftest import ROOT, build_variant, compile_for_sm90, gemv_float64
from model import Transformer


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> (transformers model, folder with model.pth), each variant built once."""
    root, built = tmp_path_factory.mktemp("qvariants"), {}

    def get(name):
        if name not in built:
            built[name] = build_variant(name, root)
        return built[name]
    return get


def quantized(ckpt_dir, mode, groupsize=None, padding="pad", **kw):
    out = ckpt_dir / f"model_{mode}_{groupsize}_{padding}_{kw.get('head', 'int8')}.pth"
    if not out.exists():
        quantize.quantize_checkpoint(ckpt_dir / "model.pth", mode, groupsize, padding, output_path=out,
                                     log=lambda *a: None, **kw)
    return out


def logits(model, ids):
    model.setup_caches(ids.size(0), ids.size(1))
    with torch.no_grad():
        return model(ids, torch.arange(ids.size(1)))


# ---------------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("shape", [(64, 96), (200, 576), (7, 33)])
def test_int8_round_trip_within_half_a_step(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.02
    w[0, 0] = 0.5  # an outlier widens its row's step, not the others'
    w[-1] = 0  # an all-zero row stays zero
    q, scales = quantize.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (shape[0],)
    deq = quantize.dequantize_int8(q, scales)
    # symmetric 8 bits: 127 steps each side of zero, so every weight is within half a step, amax / 254, of its row's
    bound = w.abs().amax(dim=1, keepdim=True) / 254
    assert ((w - deq).abs() <= bound * (1 + 1e-6) + 1e-12).all()
    assert torch.equal(deq[-1], torch.zeros(shape[1]))
    # on Gaussian rows that makes the relative error ~ (max|w| / 254) / sqrt(3) / std: well below 2 %
    assert rel_err(deq[1:-1], w[1:-1]) < 0.02


@pytest.mark.parametrize("groupsize", quantize.GROUPSIZES)
def test_int4_round_trip_within_half_a_step(groupsize):
    g = torch.Generator().manual_seed(groupsize)
    N, K = 48, 512
    w = torch.randn(N, K, generator=g) * 0.05 + 0.01
    w[3, :groupsize] = 0.7  # a constant group is represented exactly (up to bfloat16)
    packed, sz = quantize.quantize_int4(w, groupsize)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert sz.dtype == torch.bfloat16 and sz.shape == (K // groupsize, N, 2)
    deq = quantize.dequantize_int4(packed, sz, groupsize)
    # 4 bits asymmetric: 15 steps span each group's [min, max], so rounding is off by at most half a step; scale and
    # zero are stored in bfloat16 (relative precision 2^-8), which can move the grid by 2^-8 (15 * scale + |zero|)
    scale, zero = sz.float().permute(2, 1, 0)
    bound = (0.5 * scale + 2 ** -8 * (15 * scale + zero.abs())).repeat_interleave(groupsize, dim=1)
    assert ((w - deq).abs() <= bound + 1e-7).all()
    assert (deq[3, :groupsize] - 0.7).abs().max() < 0.7 * 2 ** -7
    step = (w.view(N, -1, groupsize).amax(-1) - w.view(N, -1, groupsize).amin(-1)) / 15
    rms_bound = (step.pow(2).mean() / 12).sqrt() * 1.2  # uniform rounding error has variance step^2 / 12
    assert (w - deq).pow(2).mean().sqrt() < rms_bound


def test_int4_padding_keeps_the_real_columns():
    # the padding columns take whatever code is nearest zero; the layer pads its input with zeros, so they add nothing
    w = torch.randn(32, 80)
    packed, sz = quantize.quantize_int4(w, 32, padded_in_features=96)
    deq = quantize.dequantize_int4(packed, sz, 32)
    assert deq.shape == (32, 96)
    scale = sz[-1, :, 0].float()[:, None]
    assert ((deq[:, 80:]).abs() <= 0.5 * scale + 2 ** -8 * deq[:, 64:].abs().amax(1, keepdim=True) + 1e-6).all()
    assert rel_err(deq[:, :80], w) < 0.12


def test_nibble_order_is_high_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 15, 0]])
    packed = quantize.pack_nibbles(q)
    assert packed.tolist() == [[0x12, 0x34, 0xF0]]
    assert torch.equal(quantize.unpack_nibbles(packed), q.int())


def test_cuda_word_layout_puts_column_j_in_nibble_nib_j():
    # the Triton kernel's words: column j of each group of eight in nibble [0, 4, 1, 5, 2, 6, 3, 7][j]
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    words = quantize.pack_words(q)
    assert words.dtype == torch.int32 and words.shape == (5, 8)
    bits = words.long() & 0xFFFFFFFF
    for j, nib in enumerate([0, 4, 1, 5, 2, 6, 3, 7]):
        assert torch.equal((bits >> (4 * nib)) & 15, q[:, j::8].long())
    assert torch.equal(quantize.unpack_words(words), q)


def test_int4_planes_put_pair_p_of_word_k_at_p_k():
    # the one- and two-row kernel reads x's float16 pair p of word k (columns 8k + 2p, 8k + 2p + 1) from plane p
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    planes = quantize.int4_planes(x)
    assert planes.shape == (2, 4, 8, 2) and planes.is_contiguous()
    for p in range(4):
        for k in range(8):
            assert torch.equal(planes[:, p, k], x[:, 8 * k + 2 * p: 8 * k + 2 * p + 2])


@pytest.mark.parametrize("groupsize", quantize.GROUPSIZES)
def test_cuda_word_layout_dequantizes_like_the_reference(groupsize):
    w = torch.randn(24, 512, generator=torch.Generator().manual_seed(groupsize)) * 0.05
    packed, sz = quantize.quantize_int4(w, groupsize)
    words, scales = quantize.pack_words(quantize.unpack_nibbles(packed)), quantize.pack_scales(sz)
    assert scales.dtype == torch.int32 and scales.shape == (24, 512 // groupsize)
    scale, zero = scales.view(torch.float16).view(24, -1, 2).unbind(-1)
    assert torch.equal(scale.float(), sz[:, :, 0].T.float()) and torch.equal(zero.float(), sz[:, :, 1].T.float())
    got = quantize.dequantize_words(words, scales, groupsize)
    want = quantize.dequantize_int4(packed, sz, groupsize)
    # float16 arithmetic: each weight within a few float16 steps of the float32 reference
    assert got.dtype == torch.float16 and ((got.float() - want).abs() <= want.abs() * 2 ** -9 + 1e-6).all()


# ---------------------------------------------------------------------------------------------------- kernels

def int4_pair(n, k, groupsize, bias, padded=None, seed=0):
    """Two int4 layers holding the same random weight: one to pack for the CPU kernel, one left on the reference."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    packed, sz = quantize.quantize_int4(w, groupsize, padded)
    state = {"weight": packed, "scales_and_zeros": sz}
    if bias:
        state["bias"] = torch.randn(n, generator=g)
    layers = []
    for _ in range(2):
        m = quantize.WeightOnlyInt4Linear(k, n, bias, groupsize, padded)
        m.load_state_dict(state)
        layers.append(m)
    return w, layers


@pytest.mark.parametrize("n,k,groupsize,padded,bias", [(48, 256, 32, None, False), (64, 576, 64, 640, True),
                                                       (32, 96, 32, None, True), (40, 128, 128, None, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_kernel_matches_dequantize_reference(n, k, groupsize, padded, bias, dtype):
    w, (packed, ref) = int4_pair(n, k, groupsize, bias, padded)
    packed, ref = packed.to(dtype), ref.to(dtype)
    quantize.pack_for_device(packed)
    assert packed.kernel == ("cpu" if n % 16 == 0 else "reference")
    assert ref.kernel == "reference"
    x = torch.randn(3, 5, k).to(dtype)
    with torch.no_grad():
        got, want = packed(x), ref(x)
    assert got.shape == (3, 5, n) and got.dtype == dtype
    # the kernels take bfloat16 activations (relative rounding 2^-9); the reference multiplies in x's dtype
    assert rel_err(got, want) < (2 ** -7 if dtype == torch.float32 else 2e-2)
    assert rel_err(want, x.float() @ w.T + (ref.bias.float() if bias else 0)) < 0.15  # and it is the weight


def test_int4_and_int8_compile_fullgraph():
    _, (m4, _) = int4_pair(64, 256, 64, True)
    quantize.pack_for_device(m4.float())  # as load_model does: to the model's dtype, then pack
    q, s = quantize.quantize_int8(torch.randn(32, 64))
    m8 = quantize.WeightOnlyInt8Linear(64, 32)
    m8.load_state_dict({"weight": q, "scales": s})
    quantize.pack_for_device(m8)  # on CPU: the int8 values held as float16, exactly
    assert m8.weight.dtype == torch.float16 and torch.equal(m8.weight.float(), q.float())
    for m, k in ((m4, 256), (m8, 64)):
        for rows in (1, 2):  # one row takes the int8 layer's fused reduction on CPU
            x = torch.randn(rows, k)
            with torch.no_grad():
                assert rel_err(torch.compile(m, fullgraph=True)(x), m(x)) < 1e-5
    with torch.no_grad():
        x = torch.randn(1, 64)
        assert rel_err(torch.compile(m8, fullgraph=True)(x), x @ quantize.dequantize_int8(q, s).T) < 1e-5


needs_gpu_kernel = pytest.mark.skipif(not torch.cuda.is_available() or model_module.gemv is None,
                                      reason="the int8 decode kernel needs a GPU and Triton")


@needs_gpu_kernel
@pytest.mark.parametrize("n,k", [(37, 300), (5, 2049), (1152, 896), (4096, 11008)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gpu_kernel_matches_dequantize_reference(n, k, dtype):
    torch._dynamo.reset()  # each case compiles the layer twice; with fullgraph, dynamo's recompile limit is an error
    q, s = quantize.quantize_int8(torch.randn(n, k))
    m = quantize.WeightOnlyInt8Linear(k, n, bias=True)
    m.load_state_dict({"weight": q, "scales": s, "bias": torch.randn(n)})
    m = quantize.pack_for_device(m.cuda().to(dtype))
    w = quantize.dequantize_int8(q, s).double()
    for rows in (1, 3):  # one row takes the kernel, more rows F.linear
        x = torch.randn(rows, k).to(dtype)
        want = x.double() @ w.T + m.bias.double().cpu()
        with torch.no_grad():
            for f in (m, torch.compile(m, fullgraph=True)):
                got = f(x.cuda()).double().cpu()
                assert got.shape == (rows, n)
                # float32: the kernel and F.linear sum in float32; bfloat16: the scales, the bias and the
                # output are rounded to bfloat16 (2^-9 each)
                assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(quantize.triton is None, reason="needs Triton")
@pytest.mark.parametrize("rows,groupsize,n,k", [(1, 32, 4096, 4096), (1, 128, 896, 4864), (2, 32, 22016, 4096),
                                                (2, 128, 3584, 18944)])
def test_int4_kernels_compile_for_sm90(rows, groupsize, n, k):
    # the one- and two-row kernel at the tiles _int4_mm launches on an H100 (quantize.int4_tile; 2, 4 and 8 warps), and
    # the tensor-core kernel with split K, with the inline PTX the interpreter does not run
    gw = groupsize // 8
    block_g, warps = quantize.int4_tile(rows, gw, n, k // 8, 132)
    consts = dict(GW=gw, PDL=True, ASM=True, BLOCK_M=rows, BLOCK_G=block_g)
    assert compile_for_sm90(quantize._int4_kernel, dict(X="*i32", W="*i32", SZ="*i32", Y="*fp32"), consts,
                            warps).asm["ptx"]
    if rows == 1:
        consts = dict(GW=gw, PDL=True, ASM=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=max(128, 8 * gw), SPLIT_K=2)
        pointers = dict(X="*fp16", W="*i32", SZ="*i32", Y="*fp32")
        assert compile_for_sm90(quantize._int4_dot_kernel, pointers, consts, 2).asm["ptx"]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_gpu
@pytest.mark.parametrize("n,k,groupsize,padded", [(48, 256, 32, None), (1152, 896, 32, None), (64, 576, 64, 640),
                                                  (4096, 11008, 128, 11008), (24, 1024, 256, None),
                                                  (37, 384, 128, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gpu_kernel_matches_dequantize_reference(n, k, groupsize, padded, dtype):
    torch._dynamo.reset()  # as above: a fresh compile per case
    w, (m, _) = int4_pair(n, k, groupsize, True, padded)
    ref = quantize.dequantize_int4(m.weight, m.scales_and_zeros, groupsize).double()[:, :k]
    m = quantize.pack_for_device(m.cuda().to(dtype))
    assert m.kernel == "triton"
    for rows in (1, 2, 5, 8, 9, 40):  # up to INT4_ROWS the kernel, then dequantize and F.linear
        x = torch.randn(rows, k).to(dtype)
        want = x.double() @ ref.T + m.bias.double().cpu()
        with torch.no_grad():
            for f in (m, torch.compile(m, fullgraph=True)):
                got = f(x.cuda())
                assert got.shape == (rows, n) and got.dtype == dtype
                # the kernel multiplies in float16 and returns x's dtype (bfloat16: 2^-9)
                assert rel_err(got.double().cpu(), want) < 1e-2


@needs_gpu
@pytest.mark.parametrize("name", ["llama2", "qwen2_tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,groupsize", [("int8", None), ("int4", 32)])
def test_gpu_compiled_decode_matches_dequantized(tiny, name, dtype, mode, groupsize, monkeypatch):
    if mode == "int8" and model_module.gemv is None:
        pytest.skip("the int8 decode kernel needs Triton")
    # the tiny models are narrower than the int8 four-row kernel's threshold: every one-row int8 product takes it here
    monkeypatch.setattr(model_module, "INT8_ROWS_MIN_K", 0)
    torch._dynamo.reset()  # each case compiles one, two and four rows: past dynamo's recompile limit otherwise
    hf, ckpt_dir = tiny(name)
    path = quantized(ckpt_dir, mode, groupsize)
    model = generate.load_model(path, "cuda", dtype)
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = logits(dequantized_model(path, model.config).double(), ids.long())
    model.setup_caches(1, 40)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        out = [model(ids[:, :20].cuda(), torch.arange(20, device="cuda")),
               model(ids[:, 20:24].cuda(), torch.arange(20, 24, device="cuda"))]
        for i in range(24, 34):  # one token per step, compiled: int8 and int4 take the Triton kernels
            out.append(step(ids[:, i:i + 1].cuda(), torch.tensor([i], device="cuda")).clone())
        for i, j in ((34, 36), (36, 40)):  # two and four rows, compiled: the few-row kernels (a draft, a verify)
            out.append(step(ids[:, i:j].cuda(), torch.arange(i, j, device="cuda")).clone())
    got = torch.cat(out, dim=1).double().cpu()
    # int4's kernels multiply in float16 whatever the model's dtype; garbage gives ~1.4
    assert rel_err(got, ref) < (1e-4 if mode == "int8" and dtype == torch.float32 else 3e-2)


# ---------------------------------------------------------------------------------------------------- small models

@pytest.mark.parametrize("mode", ["int8", "float"])
@pytest.mark.parametrize("name", ["llama2", "qwen2_tied", "qwen3"])
def test_fused_block_matches_the_plain_block(tiny, name, mode, monkeypatch):
    # On CUDA a block of int8 or float layers runs up to model.DOT_ROWS rows (one token, the draft's two-token step,
    # the verify's k + 1, a short prompt, a small batch; more than one row under torch.compile) as four kernel calls
    # with the residual adds folded in, and the norms and silu-mul too where model.gemv_folds
    # (TransformerBlock.forward_few_rows), gate and up merged (model.merge_gate_up). Here the kernel is replaced by
    # its contract in float64 (gemv_float64) so that the wiring (which norm, which residual, gate before up, rows
    # kept apart) is checked on CPU against the plain block; float layers are merged after the plain run.
    hf, ckpt_dir = tiny(name)
    model = generate.load_model(quantized(ckpt_dir, "int8") if mode == "int8" else ckpt_dir / "model.pth", "cpu",
                                torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    # a 5-token prompt (5 rows, a verify's shape), then single tokens
    bsz, first = 1, 5

    def decode():
        model.setup_caches(bsz, 16)
        with torch.no_grad():
            out = [model(ids[:bsz, :first], torch.arange(first))]
            return torch.cat(out + [model(ids[:bsz, i:i + 1], torch.tensor([i])) for i in range(first, 12)], dim=1)
    plain = decode()
    if mode == "float":
        model_module.merge_gate_up(model)
        assert model.layers[0].feed_forward.w13 is not None
    for m in model.modules():  # the kernel's operands: int8 again (CPU packing holds the values as float16, which
        if isinstance(m, quantize.WeightOnlyInt8Linear):  # the fused path skips), float weights [out, in] in memory
            m.weight = m.weight.to(torch.int8)
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.contiguous()
    calls = []
    monkeypatch.setattr(model_module, "use_gemv", lambda x, w: x.numel() // x.size(-1) <= model_module.DOT_ROWS)

    def gemv(x, w, scales=None, bias=None, norm_weight=None, eps=0.0, residual=None, glu=False):
        calls.append(1)  # rows on tensor cores (the 5-row prompt) get the norms and silu-mul done, as the kernel asks
        assert model_module.gemv_folds(x.size(0), w) or (norm_weight is None and not glu)
        return gemv_float64(x, w, scales, bias, norm_weight, eps, residual, glu)
    monkeypatch.setattr(model_module, "gemv", gemv)
    fused = decode()
    # every block of every step took the fused path, and the head (final norm folded in) every one-row step
    assert len(calls) == (13 - first) * model.config.n_layer * 4 + (12 - first)
    assert rel_err(fused, plain) < 1e-5


def dequantized_model(path, args):
    """The float model that the quantized checkpoint at path stands for: every layer dequantized."""
    sd = torch.load(str(path), mmap=True, weights_only=True)
    meta = sd.pop("quantization")
    for name, info in meta["layers"].items():
        if info["mode"] == "int8":
            w = quantize.dequantize_int8(sd.pop(f"{name}.weight"), sd.pop(f"{name}.scales"))
        else:
            w = quantize.dequantize_int4(sd.pop(f"{name}.weight"), sd.pop(f"{name}.scales_and_zeros"),
                                         meta["groupsize"])[:, :info["in_features"]]
        sd[f"{name}.weight"] = w
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, assign=True)
    return model.eval()


SCHEMES = [("int8", None, 0.1), ("int4", 32, 0.6), ("int4", 64, 0.6), ("int4", 128, 0.6)]


@pytest.mark.parametrize("name", ["llama2", "llama_tied", "qwen2", "qwen2_tied", "qwen3"])
@pytest.mark.parametrize("mode,groupsize,bound", SCHEMES)
def test_quantized_logits_close_to_float(tiny, name, mode, groupsize, bound):
    hf, ckpt_dir = tiny(name)
    path = quantized(ckpt_dir, mode, groupsize)
    model = generate.load_model(path, "cpu", torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    got = logits(model, ids)
    with torch.no_grad():
        ref = hf(ids).logits
    # the float model of the stored (dequantized) weights, up to the int4 kernels' bfloat16 activations: kernels,
    # padding, biases and loading are right (a wrong nibble or group would be off by ~100 %)
    assert rel_err(got, logits(dequantized_model(path, model.config), ids)) < (1e-5 if mode == "int8" else 0.03)
    # and close to the original: per layer the weights move by ~1 % (int8) / ~8 % (int4, half a step of 15 over a
    # group's range); these tiny random models amplify that a few times over their layers. Garbage gives ~1.4.
    err = rel_err(got, ref)
    assert err < bound
    if mode == "int8":
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}
    # every linear layer is quantized: the head in int8 in int4 files too, the others in the file's mode
    assert kinds.pop("output") == "WeightOnlyInt8Linear"
    assert set(kinds.values()) == {"WeightOnlyInt8Linear" if mode == "int8" else "WeightOnlyInt4Linear"}
    layers = torch.load(str(path), mmap=True, weights_only=True)["quantization"]["layers"]
    assert {n: i["mode"] for n, i in layers.items()} == {n: "int8" if n == "output" else mode for n in layers}
    # gate and up run as one matrix (model.merge_gate_up; int4 merged before packing), checked above against the
    # separate float ones
    ff = model.layers[0].feed_forward
    assert ff.w13 is not None and ff.w1 is None and ff.w3 is None
    if hf.config.tie_word_embeddings:  # the head is quantized, the embedding it was tied to is untouched
        assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight)
    if name.startswith("qwen2"):  # biases stay float and exact
        attn = hf.model.layers[0].self_attn
        want = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        assert torch.equal(model.layers[0].attention.wqkv.bias, want)
    if name == "qwen3":
        assert torch.equal(model.layers[0].attention.q_norm.weight, hf.model.layers[0].self_attn.q_norm.weight)


def test_int4_bfloat16_load(tiny):
    hf, ckpt_dir = tiny("qwen2")
    path = quantized(ckpt_dir, "int4", 32)
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    f32 = logits(generate.load_model(path, "cpu", torch.float32), ids)
    bf16 = logits(generate.load_model(path, "cpu", torch.bfloat16), ids)
    assert rel_err(bf16, f32) < 0.05


def test_padding_modes(tiny, capsys):
    hf, ckpt_dir = tiny("llama2")  # input widths 64 and 96: groupsize 64 divides the first only
    pad = quantize.quantize_checkpoint(ckpt_dir / "model.pth", "int4", 64, "pad", output_path=ckpt_dir / "pad.pth")
    said = capsys.readouterr().out
    assert "padded input width (96 -> 128) in 2 layers: layers.*.feed_forward.w2" in said
    keep = quantize.quantize_checkpoint(ckpt_dir / "model.pth", "int4", 64, "float", output_path=ckpt_dir / "f.pth")
    said = capsys.readouterr().out
    assert "left in floating point (2 layers): layers.*.feed_forward.w2" in said
    meta = torch.load(str(keep), weights_only=True)["quantization"]
    assert meta["float_layers"] == ["layers.0.feed_forward.w2", "layers.1.feed_forward.w2"]
    model = generate.load_model(keep, "cpu", torch.float32)
    assert isinstance(model.layers[0].feed_forward.w2, torch.nn.Linear)  # float (SplitLinear on a multi-core CPU)
    assert isinstance(model.layers[0].feed_forward.w13, quantize.WeightOnlyInt4Linear)  # gate and up, merged
    padded = generate.load_model(pad, "cpu", torch.float32).layers[1].feed_forward.w2
    assert (padded.in_features, padded.padded_in_features) == (96, 128)
    with pytest.raises(quantize.QuantizeError, match="does not divide the input width 96"):
        quantize.quantize_checkpoint(ckpt_dir / "model.pth", "int4", 64, "error", output_path=ckpt_dir / "e.pth")
    assert not (ckpt_dir / "e.pth").exists()


def test_tied_float_head_is_retied(tiny):
    # with an int4 head left in float (padding "float" and a groupsize wider than the model), load_model ties it again
    hf, ckpt_dir = tiny("llama_tied")
    path = quantized(ckpt_dir, "int4", 128, "float", head="int4")
    model = generate.load_model(path, "cpu", torch.float32)
    assert isinstance(model.output, torch.nn.Linear)
    assert model.output.weight is model.tok_embeddings.weight
    # an int8 head needs no groups, so the same options quantize it, and the embedding stays float and whole
    model = generate.load_model(quantized(ckpt_dir, "int4", 128, "float"), "cpu", torch.float32)
    assert isinstance(model.output, quantize.WeightOnlyInt8Linear)
    assert torch.equal(model.tok_embeddings.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize("name", ["llama_tied", "qwen2"])
def test_int4_files_keep_the_head_in_int8(tiny, name):
    hf, ckpt_dir = tiny(name)
    heads = {h: torch.load(str(quantized(ckpt_dir, "int4", 32, head=h)), weights_only=True) for h in ("int8", "int4")}
    meta8, meta4 = heads["int8"]["quantization"], heads["int4"]["quantization"]
    assert meta8["mode"] == meta4["mode"] == "int4" and meta8["format"] == quantize.FORMAT
    assert meta8["layers"]["output"] == dict(mode="int8", in_features=64, out_features=320, padded_in_features=64)
    assert meta4["layers"]["output"]["mode"] == "int4"
    assert {i["mode"] for n, i in meta8["layers"].items() if n != "output"} == {"int4"}
    # the head is the existing int8 format, rounded to nearest; the blocks are the same int4 either way
    w = hf.lm_head.weight.detach()
    q, scales = quantize.quantize_int8(w)
    assert torch.equal(heads["int8"]["output.weight"], q) and torch.equal(heads["int8"]["output.scales"], scales)
    for key in ("layers.1.feed_forward.w2.weight", "layers.0.attention.wqkv.scales_and_zeros"):
        assert torch.equal(heads["int8"][key], heads["int4"][key])
    # and it is what the head costs: int8 moves the head's weights several times less than int4 g32
    err8 = rel_err(quantize.dequantize_int8(q, scales), w)
    err4 = rel_err(quantize.dequantize_int4(heads["int4"]["output.weight"], heads["int4"]["output.scales_and_zeros"],
                                            32), w)
    assert err8 < err4 / 4, (err8, err4)


@pytest.mark.parametrize("name", ["llama_tied", "qwen2"])
def test_int8_head_files_quantize_the_head_alone(tiny, tmp_path, name):
    hf, ckpt_dir = tiny(name)
    before = sha(ckpt_dir / "model.pth")
    path = quantize.quantize_checkpoint(ckpt_dir / "model.pth", "int8-head", output_path=tmp_path / "m.pth",
                                        log=lambda *a: None)
    assert sha(ckpt_dir / "model.pth") == before
    sd, src = torch.load(str(path), weights_only=True), torch.load(str(ckpt_dir / "model.pth"), weights_only=True)
    meta = sd.pop("quantization")
    assert (meta["mode"], meta["groupsize"], meta["method"]) == ("int8", None, "rtn")  # what prepare_for_load reads
    assert meta["layers"] == {"output": dict(mode="int8", in_features=64, out_features=320, padded_in_features=64)}
    linears = [n for n, m in generate.load_model(ckpt_dir / "model.pth", "cpu", torch.float32).named_modules()
               if isinstance(m, torch.nn.Linear)]
    assert meta["float_layers"] == [n for n in linears if n != "output"]
    q, scales = quantize.quantize_int8(hf.lm_head.weight.detach())
    assert torch.equal(sd.pop("output.weight"), q) and torch.equal(sd.pop("output.scales"), scales)
    # everything else is the input's float tensors, the embedding too when the head was tied to it
    assert set(sd) == set(src) - {"output.weight"}
    assert all(sd[k].dtype == src[k].dtype and torch.equal(sd[k], src[k]) for k in sd)


@pytest.mark.parametrize("name", ["qwen2_tied", "llama2"])
def test_int8_head_logits_match_the_float_model_with_a_dequantized_head(tiny, name):
    hf, ckpt_dir = tiny(name)
    path = quantize.quantize_checkpoint(ckpt_dir / "model.pth", "int8-head", output_path=ckpt_dir / "head8.pth",
                                        log=lambda *a: None)
    model = generate.load_model(path, "cpu", torch.float32)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n != "output" and isinstance(m, torch.nn.Linear)}
    assert isinstance(model.output, quantize.WeightOnlyInt8Linear) and kinds <= {"Linear", "SplitLinear"}
    # the reference: the float model, its head replaced (and so untied) by the file's int8 head dequantized
    sd = torch.load(str(path), weights_only=True)
    ref = generate.load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    ref.output.weight = torch.nn.Parameter(quantize.dequantize_int8(sd["output.weight"], sd["output.scales"]))
    float_model = generate.load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    assert torch.equal(model.tok_embeddings.weight, float_model.tok_embeddings.weight)  # a tied embedding stays float
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    got = logits(model, ids)
    assert rel_err(got, logits(ref, ids)) < 1e-5
    # and the head is really int8: rounding its weights by ~0.5 % moves the logits by far more than the above
    assert rel_err(got, logits(float_model, ids)) > 1e-3


# ---------------------------------------------------------------------------------------------------- metadata

def test_renamed_file_loads_the_same(tiny):
    hf, ckpt_dir = tiny("qwen2_tied")
    path = quantized(ckpt_dir, "int4", 32)
    renamed = ckpt_dir / "model_int8.pth"  # a misleading name: the scheme travels inside the file
    shutil.copy(path, renamed)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    model = generate.load_model(renamed, "cpu", torch.float32)
    assert isinstance(model.output, quantize.WeightOnlyInt8Linear)
    assert isinstance(model.layers[0].attention.wqkv, quantize.WeightOnlyInt4Linear)
    assert torch.equal(logits(model, ids), logits(generate.load_model(path, "cpu", torch.float32), ids))


def as_format_1(sd):
    """The metadata as the first quantize.py wrote it: no per-layer modes, every layer in the file's mode."""
    sd["quantization"]["format"] = 1
    for info in sd["quantization"]["layers"].values():
        del info["mode"]


def tamper(src, dst, edit):
    sd = torch.load(str(src), weights_only=True)
    edit(sd)
    torch.save(sd, str(dst))
    return dst


TAMPERS = {
    "groupsize": (lambda sd: sd["quantization"].update(groupsize=64), "implies torch.bfloat16"),
    "mode": (lambda sd: sd["quantization"].update(mode="int8"), "'int4' in the quantization metadata of an int8 file"),
    "head mode": (lambda sd: sd["quantization"]["layers"]["output"].update(mode="int4"), "implies torch.uint8"),
    "layer mode": (lambda sd: sd["quantization"]["layers"]["layers.1.attention.wo"].update(mode="int8"),
                   "layers.1.attention.wo.weight is torch.uint8 .* implies torch.int8"),
    "no layer mode": (lambda sd: sd["quantization"]["layers"]["output"].pop("mode"),
                      "output is None in the quantization metadata"),
    "format 1 with an int8 head": (as_format_1, "output.weight is torch.int8 .* implies torch.uint8"),
    "format": (lambda sd: sd["quantization"].update(format=99), "unknown quantization format 99"),
    "layer list": (lambda sd: sd["quantization"]["layers"].pop("output"), "does not list the model's layers"),
    "tensor": (lambda sd: sd.pop("layers.0.attention.wo.scales_and_zeros"), "is missing"),
}


@pytest.mark.parametrize("what", list(TAMPERS))
def test_tampered_file_is_refused(tiny, what):
    hf, ckpt_dir = tiny("llama_tied")
    path = quantized(ckpt_dir, "int4", 32)
    edit, message = TAMPERS[what]
    bad = tamper(path, ckpt_dir / f"tampered_{what.replace(' ', '_')}.pth", edit)
    with pytest.raises(generate.UserError, match=message):
        generate.load_model(bad, "cpu", torch.float32)


def test_format_1_still_loads(tiny):
    # a file written before per-layer modes (int4 head, format 1) loads as it did: every layer in the file's mode
    hf, ckpt_dir = tiny("qwen2_tied")
    path = quantized(ckpt_dir, "int4", 32, head="int4")
    old = tamper(path, ckpt_dir / "format1.pth", as_format_1)
    model = generate.load_model(old, "cpu", torch.float32)
    assert isinstance(model.output, quantize.WeightOnlyInt4Linear)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(logits(model, ids), logits(generate.load_model(path, "cpu", torch.float32), ids))


def test_tampered_file_cli_one_line(tiny):
    hf, ckpt_dir = tiny("llama_tied")
    bad = tamper(quantized(ckpt_dir, "int4", 32), ckpt_dir / "tampered_cli.pth",
                 lambda sd: sd["quantization"].update(groupsize=128))
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(bad), "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "the file was altered" in lines[0], r.stderr


# ---------------------------------------------------------------------------------------------------- the CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "quantize.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_cli_writes_beside_the_input_and_keeps_it(tiny, tmp_path):
    hf, ckpt_dir = tiny("qwen3")
    work = tmp_path / "ckpt"
    work.mkdir()
    for f in ("model.pth", "model_config.json"):
        shutil.copy(ckpt_dir / f, work / f)
    before = sha(work / "model.pth")
    runs = [(("--mode", "int8"), "model_int8.pth", "int8"), (("--mode", "int8-head"), "model_int8-head.pth", "int8"),
            (("--mode", "int4", "--groupsize", "32"), "model_int4.g32.pth", "int8"),
            (("--mode", "int4", "--groupsize", "32", "--head", "int4"), "model_int4.g32.head-int4.pth", "int4")]
    for args, name, head in runs:
        r = run_cli("--checkpoint_path", work / "model.pth", *args)
        assert r.returncode == 0, r.stderr
        assert (work / name).is_file() and f"wrote {work / name}" in r.stdout
        int8_head_said = "kept in int8, one scale per output channel: output" in r.stdout
        assert int8_head_said == (args[1] != "int8" and head == "int8")
        meta = torch.load(str(work / name), weights_only=True)["quantization"]
        assert meta["mode"] == args[1][:4] and meta["groupsize"] == (32 if args[1] == "int4" else None)
        assert meta["layers"]["output"]["mode"] == head
        assert (list(meta["layers"]) == ["output"]) == (args[1] == "int8-head")
    assert sha(work / "model.pth") == before
    assert not list(work.glob("*.tmp"))
    # re-quantizing a quantized checkpoint is refused, whatever its name
    r = run_cli("--checkpoint_path", work / "model_int4.g32.pth", "--mode", "int8")
    assert r.returncode != 0 and "already quantized (int4 g32)" in r.stderr


BAD = [
    (("--mode", "int3"), "unknown --mode 'int3'"),
    (("--mode", "int4", "--groupsize", "48"), "--groupsize 48 is not supported"),
    (("--mode", "int4", "--groupsize", "abc"), "invalid int value: 'abc'"),
    (("--mode", "int4", "--groupsize", "128", "--padding", "error"), "does not divide the input width 64"),
    (("--mode", "int4", "--padding", "zeros"), "unknown --padding 'zeros'"),
    (("--mode", "int8", "--groupsize", "32"), "drop --groupsize"),
    (("--mode", "int8", "--head", "int4"), "drop --head int4"),
    (("--mode", "int8-head", "--groupsize", "32"), "drop --groupsize"),
    (("--mode", "int8-head", "--head", "int4"), "--mode int8-head stores the head in int8: drop --head int4"),
    (("--mode", "int4", "--head", "fp16"), "unknown --head 'fp16'"),
    (("--mode", "int4-gptq", "--calibration_samples", "0"), "--calibration_samples must be >= 1"),
    (("--mode", "int4-gptq", "--calibration_file", "/nonexistent.txt"),
     "--calibration_file /nonexistent.txt not found"),
    (("--mode", "int8", "--device", "cuda"), "no GPU is visible"),
    (("--mode", "int8", "--bogus"), "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_cli_bad_input_one_line(tiny, args, message):
    hf, ckpt_dir = tiny("llama_tied")
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    before = set(ckpt_dir.iterdir())
    r = run_cli("--checkpoint_path", ckpt_dir / "model.pth", *args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert set(ckpt_dir.iterdir()) == before  # failed before any work: nothing written


def test_cli_bad_paths(tiny, tmp_path):
    hf, ckpt_dir = tiny("llama_tied")
    cases = [(("--checkpoint_path", tmp_path / "none.pth", "--mode", "int8"), "not found"),
             (("--checkpoint_path", ckpt_dir / "model.pth", "--mode", "int8", "--output_path",
               ckpt_dir / "model.pth"), "would overwrite the input")]
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(ckpt_dir / "model.pth", lonely / "model.pth")
    cases.append((("--checkpoint_path", lonely / "model.pth", "--mode", "int8"), "model_config.json not found"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    shutil.copy(ckpt_dir / "model_config.json", tmp_path / "model_config.json")
    cases.append((("--checkpoint_path", tmp_path / "junk.pth", "--mode", "int8"), "the file is corrupt"))
    before = sha(ckpt_dir / "model.pth")
    for args, message in cases:
        r = run_cli(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    assert sha(ckpt_dir / "model.pth") == before


# ---------------------------------------------------------------------------------------------------- real models

def real_model(name):
    offline = pytest.importorskip("scripts.offline_models")
    return offline.prepare(name)


@pytest.fixture(scope="session")
def real_quantized(tmp_path_factory):
    """(float folder, {scheme: quantized model.pth in a folder beside its config and tokenizer}) per real model."""
    made = {}

    def get(name, schemes):
        src = real_model(name)
        out = tmp_path_factory.mktemp(name.split("-")[0])
        for f in src.iterdir():
            if f.suffix != ".pth" and f.suffix != ".gguf" and f.is_file():
                (out / f.name).symlink_to(f)
        paths = {}
        for scheme in schemes:  # (mode, groupsize) or (mode, groupsize, head)
            key = (name, *scheme)
            if key not in made:
                made[key] = quantize.quantize_checkpoint(src / "model.pth", *scheme[:2], output_path=out /
                                                         f"{'_'.join(map(str, scheme))}.pth", log=lambda *a: None,
                                                         head=scheme[2] if len(scheme) > 2 else "int8")
            paths[scheme] = made[key]
        return src, paths
    return get


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def greedy(model, tokenizer, prompt, n):
    ids = generate.encode_prompt(tokenizer, prompt, "cpu")
    model.setup_caches(1, ids.numel() + n + 8)
    y, _ = generate.generate(model, ids, n, temperature=0)
    return y[0, ids.numel():].tolist()


def next_token_logits(model, prompt_ids, continuation):
    """Logits [len(continuation), V] that predict each continuation token, teacher-forced in one pass."""
    return logits(model, torch.tensor([prompt_ids + continuation]))[0, len(prompt_ids) - 1:-1]


@pytest.mark.parametrize("name,int4_groupsize", [("SmolLM2-135M-Instruct", 32), ("Qwen2.5-Coder-0.5B-Instruct", 128)])
def test_real_model_quantized_text(real_quantized, name, int4_groupsize):
    from tokenizer import get_tokenizer
    src, paths = real_quantized(name, [("int8", None), ("int4", int4_groupsize)])
    tokenizer = get_tokenizer(src)
    ref = generate.load_model(src / "model.pth", "cpu", torch.float32)
    int8 = generate.load_model(paths[("int8", None)], "cpu", torch.float32)
    int4 = generate.load_model(paths[("int4", int4_groupsize)], "cpu", torch.float32)
    n = 12
    for prompt in PROMPTS:
        ids = generate.encode_prompt(tokenizer, prompt, "cpu").tolist()
        want = greedy(ref, tokenizer, prompt, n)
        f = next_token_logits(ref, ids, want)
        # int8 makes the float model's greedy choice at every step (so it generates the same tokens), except where
        # the float model itself was torn between two tokens; on SmolLM2 the greedy texts are simply equal
        same = next_token_logits(int8, ids, want).argmax(-1) == f.argmax(-1)
        top2 = f.topk(2).values
        assert (same | (top2[:, 0] - top2[:, 1] < 0.5)).all(), (prompt, same)
        if name.startswith("SmolLM2"):
            assert same.all(), prompt
        # int4 may choose other words, but words the float model itself finds likely: random tokens from the
        # vocabulary would score a perplexity in the thousands, word salad in the hundreds
        text4 = greedy(int4, tokenizer, prompt, n)
        nll = torch.nn.functional.cross_entropy(next_token_logits(ref, ids, text4), torch.tensor(text4))
        own = torch.nn.functional.cross_entropy(f, torch.tensor(want))
        assert math.exp(nll) < 2 * math.exp(own) + 3, (prompt, tokenizer.decode(text4), math.exp(nll))


def test_real_int8_head_keeps_most_of_int4_quality(real_quantized):
    # SmolLM2's head is its tied embedding: in int4 it costs most of int4 g32's loss, in int8 almost nothing
    from tokenizer import get_tokenizer
    src, paths = real_quantized("SmolLM2-135M-Instruct", [("int4", 32), ("int4", 32, "int4")])
    ids = quantize.calibration_tokens(get_tokenizer(src), quantize.wiki_texts("eval"), 2, 256)
    nll = {}
    for key, path in (("float", src / "model.pth"), ("int8 head", paths[("int4", 32)]),
                      ("int4 head", paths[("int4", 32, "int4")])):
        out = logits(generate.load_model(path, "cpu", torch.float32), ids)[:, :-1]
        nll[key] = torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1)).item()
    loss8, loss4 = nll["int8 head"] - nll["float"], nll["int4 head"] - nll["float"]
    assert loss4 > 0.02 and loss8 < loss4 / 3, nll
