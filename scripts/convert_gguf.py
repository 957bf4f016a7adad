# Convert a GGUF file (llama.cpp's format: Llama, Mistral, SmolLM2, Qwen 1, Qwen2/2.5, Qwen3) into model.pth +
# model_config.json + the tokenizer files. Quantized tensors are dequantized with the gguf package.
import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import CONFIG_NAME, ModelArgs, Transformer, apply_llama3_scaling  # noqa: E402
from scripts.convert_hf_checkpoint import ConvertError, check_complete, save_atomic  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "qwen")
# Tensor types we read, dequantized to float32 by the gguf package (llama.cpp's own Python library).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Our name <- GGUF name ({} is the layer index). q, k, v are fused into wqkv afterwards.
GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wq.bias": "blk.{}.attn_q.bias",
    "layers.{}.attention.wk.bias": "blk.{}.attn_k.bias",
    "layers.{}.attention.wv.bias": "blk.{}.attn_v.bias",
    "layers.{}.attention.wqkv.weight": "blk.{}.attn_qkv.weight",  # Qwen 1: already fused as q, k, v
    "layers.{}.attention.wqkv.bias": "blk.{}.attn_qkv.bias",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.attention.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "layers.{}.attention.k_norm.weight": "blk.{}.attn_k_norm.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
}
OURS = {gguf_name: ours for ours, gguf_name in GGUF_NAMES.items()}


def open_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise ConvertError("reading GGUF files needs the gguf package: pip install gguf") from None
    if not path.is_file():
        raise ConvertError(f"{path} not found: pass the path of a .gguf file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConvertError(f"cannot read {path} as GGUF ({type(e).__name__}: {reason}): the file is not a GGUF "
                           "or is truncated; download it again") from e


def read_meta(reader, key: str, default=ValueError):
    field = reader.get_field(key)
    if field is None:
        if default is ValueError:
            raise ConvertError(f"the GGUF has no {key!r} metadata: it was not written by a known converter")
        return default
    return field.contents()


def f32_value(x: float) -> float:
    # metadata floats are float32: keep the shortest decimal that reads back the same (1e-05, not 9.99999974e-06)
    return float(str(np.float32(x)))


def rope_scaling_from_factors(factors: torch.Tensor, head_dim: int, base: float) -> Optional[dict]:
    """llama.cpp stores Llama-3.1 rope scaling as one divisor per frequency (the rope_freqs tensor). Find llama3
    scaling parameters giving the same frequencies, and check that they do."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factors = factors.double().flatten()
    if factors.shape != freqs.shape:
        raise ConvertError(f"rope_freqs has {factors.numel()} values, expected head_dim / 2 = {freqs.numel()}")
    if torch.all(factors == 1):
        return None
    top = factors.max().item()
    scaled, unscaled = factors >= top * (1 - 1e-6), factors <= 1 + 1e-6
    mid = ~scaled & ~unscaled
    # In between the divisor is 1 / ((1 - s) / top + s) with s linear in freq: s = 0 at f0 and 1 at f1.
    # Only s matters, so low_freq_factor = 1, original_max_position_embeddings = 2 pi / f0, high = f1 / f0.
    s = (1 / factors - 1 / top) / (1 - 1 / top)
    f_s = freqs[scaled].max().item()
    f_u = freqs[unscaled].min().item() if unscaled.any() else 2 * freqs.max().item()
    if mid.sum() >= 2:
        a, b = np.polyfit(freqs[mid].numpy(), s[mid].numpy(), 1)
        f0, f1 = -b / a, (1 - b) / a
    elif mid.sum() == 1:  # any line through the one point that keeps the ends on their sides
        f_m, s_m = freqs[mid].item(), s[mid].item()
        w = min((f_m - f_s) / s_m, (f_u - f_m) / (1 - s_m)) / 2
        f0, f1 = f_m - s_m * w, f_m + (1 - s_m) * w
    else:
        f0, f1 = f_s + (f_u - f_s) / 3, f_s + 2 * (f_u - f_s) / 3
    old_len, high = 2 * math.pi / f0, f1 / f0
    target = (freqs / factors).float()
    for old, hi in ((round(old_len), round(high, 4)), (old_len, high)):  # prefer the round numbers if they fit
        cfg = dict(rope_type="llama3", factor=f32_value(top), low_freq_factor=1.0, high_freq_factor=hi,
                   original_max_position_embeddings=old)
        if torch.allclose(apply_llama3_scaling(freqs.float(), cfg), target, rtol=1e-5, atol=0):
            return cfg
    raise ConvertError("the rope_freqs tensor is not Llama-3 style rope scaling, which is the only kind supported")


def model_args_from_gguf(reader) -> ModelArgs:
    arch = read_meta(reader, "general.architecture")
    if arch not in ARCHS:
        raise ConvertError(f"unsupported GGUF architecture {arch!r}: supported are {', '.join(ARCHS)}")
    if read_meta(reader, "split.count", 1) > 1:
        raise ConvertError("this GGUF is one part of a split model: merge the parts with llama-gguf-split --merge")

    def meta(key, default=ValueError):
        value = read_meta(reader, f"{arch}.{key}", default)
        if isinstance(value, list):
            raise ConvertError(f"{arch}.{key} differs between layers ({value}): such models are not supported")
        return value

    n_head, dim = meta("attention.head_count"), meta("embedding_length")
    head_dim = meta("attention.key_length", dim // n_head)
    if meta("attention.value_length", head_dim) != head_dim or meta("rope.dimension_count", head_dim) != head_dim:
        raise ConvertError("models whose rope covers part of a head, or whose value heads differ in size from the "
                           "key heads, are not supported")
    scaling_type = meta("rope.scaling.type", "none")
    if scaling_type != "none" and meta("rope.scaling.factor", 1.0) != 1.0:
        raise ConvertError(f"rope scaling {scaling_type!r} is not supported (only Llama-3 style rope_freqs)")
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ConvertError("the GGUF has no token_embd.weight tensor: it is not a complete language model")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rope_base = f32_value(meta("rope.freq_base", 10000.0))
    rope_scaling = None
    if "rope_freqs.weight" in names:
        rope_scaling = rope_scaling_from_factors(
            dequantize(next(t for t in reader.tensors if t.name == "rope_freqs.weight")), head_dim, rope_base)
    return ModelArgs(
        block_size=meta("context_length"), vocab_size=int(embedding.shape[1]), n_layer=meta("block_count"),
        n_head=n_head, dim=dim, intermediate_size=meta("feed_forward_length"),
        n_local_heads=meta("attention.head_count_kv", n_head), head_dim=head_dim, rope_base=rope_base,
        rope_scaling=rope_scaling, norm_eps=f32_value(meta("attention.layer_norm_rms_epsilon")),
        qkv_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, tie_word_embeddings="output.weight" not in names)


def dequantize(tensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch's layout (GGUF lists dimensions innermost first)."""
    from gguf import dequantize as gguf_dequantize
    values = gguf_dequantize(tensor.data, tensor.tensor_type)
    if not values.flags.writeable:  # F32 data is a read-only view of the mapped file
        values = values.copy()
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(
        tuple(int(d) for d in reversed(tensor.shape)))


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp interleaves the two rope halves of each head of q and k (row 2i, 2i+1 = pair i); we keep HF's halves
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def convert_state_dict(reader, args: ModelArgs, arch: str, dtype: torch.dtype) -> dict:
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(TENSOR_TYPES))
    if bad:
        raise ConvertError(f"tensor type(s) {', '.join(bad)} not supported: supported are {', '.join(TENSOR_TYPES)}; "
                           "use a GGUF quantized with one of those")
    sd = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # read into the config already
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", tensor.name)
        key = f"blk.{{}}.{m.group(2)}" if m else tensor.name
        if key not in OURS:
            raise ConvertError(f"unexpected tensor {tensor.name!r}: this GGUF has parts our model does not")
        w = dequantize(tensor)
        if arch == "llama" and key in ("blk.{}.attn_q.weight", "blk.{}.attn_q.bias"):
            w = unpermute(w, args.n_head)
        elif arch == "llama" and key in ("blk.{}.attn_k.weight", "blk.{}.attn_k.bias"):
            w = unpermute(w, args.n_local_heads)
        sd[OURS[key].format(m.group(1) if m else None)] = w.to(dtype)
    for i in range(args.n_layer):
        p = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            parts = [sd.pop(p + w + "." + kind, None) for w in ("wq", "wk", "wv")]
            if all(t is not None for t in parts):
                sd[p + "wqkv." + kind] = torch.cat(parts)
    if args.tie_word_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # one tensor under both names: saved once
    return sd


def check_shapes(sd: dict, args: ModelArgs) -> None:
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ConvertError(f"tensor {name} has shape {tuple(t.shape)} but the GGUF metadata implies "
                               f"{tuple(expected[name].shape)}: the file is inconsistent")


@torch.inference_mode()
def convert_gguf(gguf_path: Path, checkpoint_dir: Path, dtype: str = "float32") -> Path:
    gguf_path, checkpoint_dir = Path(gguf_path), Path(checkpoint_dir)
    reader = open_gguf(gguf_path)
    args = model_args_from_gguf(reader)
    sd = convert_state_dict(reader, args, read_meta(reader, "general.architecture"), getattr(torch, dtype))
    check_complete(sd, args)
    check_shapes(sd, args)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    outputs = [checkpoint_dir / "model.pth", checkpoint_dir / CONFIG_NAME]
    if gguf_path.resolve() in [p.resolve() for p in outputs]:
        raise ConvertError(f"{gguf_path} would be overwritten: choose another --checkpoint_dir")
    if reader.get_field("tokenizer.ggml.model") is not None:
        from tokenizer import write_tokenizer_from_gguf
        write_tokenizer_from_gguf(reader, checkpoint_dir)  # takes the open reader: reopening costs seconds
    else:
        print(f"note: {gguf_path.name} holds no tokenizer; pass --tokenizer_path to generate.py", file=sys.stderr)
    save_atomic(sd, outputs[0])
    tmp = outputs[1].with_name(outputs[1].name + ".tmp")
    args.save(tmp)
    os.replace(tmp, outputs[1])  # written last: its presence means the checkpoint is complete
    return outputs[0]


def main():
    parser = argparse.ArgumentParser(description="Convert a GGUF file (llama.cpp) to model.pth + model_config.json.")
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file (Llama, Mistral, Qwen 1/2/2.5/3)")
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="folder to write model.pth etc. into")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored (dequantized) weights")
    a = parser.parse_args()
    try:
        out = convert_gguf(a.gguf, a.checkpoint_dir, a.dtype)
    except (ConvertError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
