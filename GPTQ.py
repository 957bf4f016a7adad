# GPTQ (Frantar et al., 2022): quantize a linear layer's weight one column at a time and push each column's rounding
# error onto the columns not yet quantized, weighted by the inverse of H = X^T X of the layer's inputs X, so that the
# layer's output on those inputs moves as little as possible. The model goes one TransformerBlock at a time: the
# block's inputs are captured once, its sublayers are quantized in forward order (each seeing the inputs produced by
# the already quantized ones), and its outputs become the next block's inputs. The result is quantize.py's int4 format.
# quantize.py passes only the int4 layers: the output head of int4 files is int8, rounded to nearest there.
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Transformer, precompute_rope
from quantize import dequantize_int4, int4_qparams, int4_round, pack_nibbles, quantize_int4

# GPTQ walks the columns one at a time, so its cost is a few small ops per column and per chunk of rows: rows go in
# chunks this large (a float32 copy of 512 MB, a few working copies of it) so that a 7B's largest matrix is one chunk
# (the 4M-weight chunks of quantize.py made the column loop run 17 times over a 3584 x 18944 matrix: 55 s on an H100)
ROWS_CHUNK = 1 << 27

# the sublayers of a block in forward order; the layers of one group read the same input, so share one Hessian
BLOCK_GROUPS = (("attention.wqkv",), ("attention.wo",), ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",))


def inverse_hessian_factor(H: Tensor, percdamp: float, perm: Tensor = None) -> Tensor:
    """Upper Cholesky factor of (H + damping)^-1, in the column order perm; row i holds how the error of column i
    spreads over the later columns."""
    H = H.double().clone()  # the inversion is the one place where float32 round-off hurts
    if perm is not None:
        H = H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.size(0), dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()


def gptq_rows(W: Tensor, U: Tensor, groupsize: int, blocksize: int, perm: Tensor = None) -> tuple[Tensor, Tensor]:
    """GPTQ of the rows W [n, K] (float32) given the factor U -> (codes [n, K], scales_and_zeros [K / groupsize, n, 2]).
    With perm (act order) the groups keep their original columns and take their parameters from the weight before any
    update; otherwise a group takes them from its updated columns when it starts."""
    n, K = W.shape
    if perm is not None:
        scale, zero = int4_qparams(W.view(n, K // groupsize, groupsize))
        scale, zero = scale.T.contiguous(), zero.T.contiguous()  # [K / groupsize, n]
        group_of = (perm // groupsize).tolist()
        W = W[:, perm]
    else:
        scale = torch.empty(K // groupsize, n, device=W.device)
        zero = torch.empty_like(scale)
        group_of = [c // groupsize for c in range(K)]
    Wt = W.T.contiguous()  # a column of W is a contiguous row here: the updates below stream through memory
    Q = torch.empty_like(Wt)
    for i1 in range(0, K, blocksize):  # lazy batches: the rest of the matrix is updated once per block of columns
        i2 = min(i1 + blocksize, K)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            c, g = i1 + i, group_of[i1 + i]
            if perm is None and c % groupsize == 0:  # blocksize is a multiple of groupsize: the group is in W1
                scale[g], zero[g] = int4_qparams(W1[i:i + groupsize].T)
            q = int4_round(W1[i], scale[g], zero[g])
            Q[c] = q
            Err1[i] = (W1[i] - ((q - 8) * scale[g] + zero[g])) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], Err1[i], alpha=-1)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
    Q = Q.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, torch.stack([scale, zero], dim=-1)


def gptq_quantize_weight(W: Tensor, H: Tensor, groupsize: int, padded_in_features: int = None, percdamp: float = 0.01,
                         blocksize: int = 128, act_order: bool = False) -> tuple[Tensor, Tensor]:
    """W [N, K] (any dtype or device; read only) and H [Kp, Kp] on the compute device -> int4 weight in quantize.py's
    format: (uint8 [N, Kp / 2], bfloat16 [Kp / groupsize, N, 2]) on the CPU. Rows go in chunks to bound memory."""
    N, K = W.shape
    kp = padded_in_features or K
    H = H.clone()
    dead = torch.diag(H) == 0  # inputs always zero (padding, dead features): nothing to fit, round as is
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    U = inverse_hessian_factor(H, percdamp, perm)
    blocksize = max(1, blocksize // groupsize) * groupsize
    packed, sz = [], []
    step = max(1, ROWS_CHUNK // kp)
    for r in range(0, N, step):
        w = F.pad(W[r:r + step].to(H.device, torch.float32), (0, kp - K))
        q, s = gptq_rows(w, U, groupsize, blocksize, perm)
        packed.append(pack_nibbles(q).cpu())
        sz.append(s.bfloat16().cpu())
    return torch.cat(packed), torch.cat(sz, dim=1)


def output_errors(W: Tensor, packed: Tensor, scales_and_zeros: Tensor, H: Tensor, groupsize: int) -> tuple:
    """Relative output error ||X (W - Wq)^T||^2 / ||X W^T||^2 on the inputs summarised by H = X^T X / n, of the
    given int4 weight and of round-to-nearest, computed over chunks of rows."""
    kp = H.size(0)
    gptq = rtn = den = 0.0
    step = max(1, ROWS_CHUNK // kp)
    for r in range(0, W.size(0), step):
        w = F.pad(W[r:r + step].to(H.device, torch.float32), (0, kp - W.size(1)))
        wq = dequantize_int4(packed[r:r + step], scales_and_zeros[:, r:r + step], groupsize).to(H.device)
        wr = dequantize_int4(*quantize_int4(w, groupsize), groupsize).to(H.device)
        gptq += (((w - wq) @ H) * (w - wq)).sum().item()
        rtn += (((w - wr) @ H) * (w - wr)).sum().item()
        den += ((w @ H) * w).sum().item()
    return gptq / max(den, 1e-30), rtn / max(den, 1e-30)


class _Captured(Exception):
    pass


def capture_hessian(block: nn.Module, name: str, inputs: list, kp: int, *block_args) -> Tensor:
    """H = X^T X / n [kp, kp] of the inputs that sublayer `name` of `block` sees when the block runs on `inputs`;
    each run stops at that sublayer."""
    linear = block.get_submodule(name)
    x0 = inputs[0]
    H = torch.zeros(kp, kp, device=x0.device)
    count = [0]

    def hook(module, args):
        x = args[0].reshape(-1, args[0].size(-1)).float()
        H[:x.size(1), :x.size(1)].addmm_(x.T, x)
        count[0] += x.size(0)
        raise _Captured

    handle = linear.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            try:
                block(x, *block_args)
            except _Captured:
                pass
    finally:
        handle.remove()
    return H / count[0]


def _quantize_and_report(log, name: str, W: Tensor, H: Tensor, groupsize: int, kp: int, **gptq_kwargs):
    t0 = time.perf_counter()
    packed, sz = gptq_quantize_weight(W, H, groupsize, kp, **gptq_kwargs)
    seconds = time.perf_counter() - t0
    err, rtn = output_errors(W, packed, sz, H, groupsize)
    log(f"{name}: {W.size(0)}x{W.size(1)} in {seconds:.1f} s, output error {err:.2e} (round to nearest {rtn:.2e})")
    return packed, sz


@torch.no_grad()
def gptq_quantize_model(model: Transformer, calibration: Tensor, layers: dict, groupsize: int, device="cpu",
                        percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False, batch_size: int = 8,
                        log=print) -> dict:
    """GPTQ of the layers named in `layers` (name -> {"in_features", "padded_in_features", ...}: the int4 layers planned
    by quantize.plan_layers) on the calibration token ids [S, L]. The model's weights are only read (they may be a
    memory-mapped checkpoint); one block at a time is copied to `device` in float32.
    Returns {name: (uint8 weight, bfloat16 scales_and_zeros)} in quantize.py's int4 format."""
    cfg = model.config
    S, L = calibration.shape
    rope = precompute_rope(L, cfg.head_dim, cfg.rope_base, cfg.rope_scaling).to(device)
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool, device=device))[None, None]
    input_pos = torch.arange(L, device=device)
    emb = model.tok_embeddings.weight
    xs = [F.embedding(calibration[i:i + batch_size], emb).to(device, torch.float32) for i in range(0, S, batch_size)]
    results, opts = {}, dict(percdamp=percdamp, blocksize=blocksize, act_order=act_order)
    log(f"GPTQ on {S} x {L} calibration tokens, groupsize {groupsize}, damping {percdamp}, "
        f"{'act order, ' if act_order else ''}on {device}")
    for i, block in enumerate(model.layers):
        block = copy.deepcopy(block).to(device=device, dtype=torch.float32)  # never write to the mapped weights
        for group in BLOCK_GROUPS:
            names = [n for n in group if f"layers.{i}.{n}" in layers]
            if not names:
                continue
            kp = layers[f"layers.{i}.{names[0]}"]["padded_in_features"]
            H = capture_hessian(block, names[0], xs, kp, rope, mask, input_pos)
            for n in names:
                linear = block.get_submodule(n)
                packed, sz = _quantize_and_report(log, f"layers.{i}.{n}", linear.weight, H, groupsize, kp, **opts)
                results[f"layers.{i}.{n}"] = (packed, sz)
                wq = dequantize_int4(packed, sz, groupsize)[:, :linear.in_features]
                linear.weight = nn.Parameter(wq.to(device), requires_grad=False)  # later sublayers see it quantized
        if i + 1 < len(model.layers) or "output" in layers:  # the last outputs only calibrate an int4 head
            xs = [block(x, rope, mask, input_pos) for x in xs]
        del block
    if "output" in layers:
        norm = copy.deepcopy(model.norm).to(device=device, dtype=torch.float32)
        kp = layers["output"]["padded_in_features"]
        H = torch.zeros(kp, kp, device=device)
        for x in xs:
            h = norm(x).reshape(-1, x.size(-1))
            H[:h.size(1), :h.size(1)].addmm_(h.T, h)
        H /= S * L
        results["output"] = _quantize_and_report(log, "output", model.output.weight, H, groupsize, kp, **opts)
    return results
