# Convert a Hugging Face checkpoint folder (Llama, Mistral, Qwen 1/1.5/2/2.5/3) into model.pth + model_config.json.
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import CONFIG_NAME, ModelArgs  # noqa: E402

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "qwen.tiktoken")


class ConvertError(ValueError):
    pass


def model_args_from_hf_config(cfg: dict) -> ModelArgs:
    """Map an HF config.json onto ModelArgs. Reads both rope spellings (top level and transformers 5's rope_parameters)."""
    mtype = cfg.get("model_type")
    if mtype == "qwen":  # Qwen 1: its own names, and intermediate_size counts both MLP halves
        return ModelArgs(
            block_size=cfg.get("seq_length", 2048), vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"], dim=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"] // 2,
            head_dim=cfg.get("kv_channels"), rope_base=float(cfg.get("rotary_emb_base", 10000)),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-6), qkv_bias=True,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    if mtype not in LLAMA_LIKE:
        raise ConvertError(f"unsupported model_type {mtype!r}: supported are {', '.join(LLAMA_LIKE + ('qwen',))}")
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in ("default", "llama3"):
        raise ConvertError(f"rope scaling type {rope_type!r} is not supported (only default and llama3)")
    block_size = cfg.get("max_position_embeddings", 2048)
    if mtype == "mistral" and cfg.get("sliding_window"):
        block_size = min(block_size, cfg["sliding_window"])  # past the window a full cache would be wrong
    if mtype == "llama" and cfg.get("attention_bias"):
        raise ConvertError("Llama checkpoints with attention_bias=True are not supported")
    return ModelArgs(
        block_size=block_size, vocab_size=cfg["vocab_size"], n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"], dim=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        n_local_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim=cfg.get("head_dim"),
        rope_base=float(rope_theta),
        rope_scaling={k: v for k, v in scaling.items() if k != "type"} if rope_type == "llama3" else None,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), qkv_bias=mtype == "qwen2", qk_norm=mtype == "qwen3",
        tie_word_embeddings=cfg.get("tie_word_embeddings", False))


# Our name <- HF name, per layer ({} is the layer index). q, k, v are fused into wqkv afterwards.
LLAMA_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wq.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.attention.wk.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.attention.wv.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attention.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.attention.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
QWEN1_NAMES = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wqkv.weight": "transformer.h.{}.attn.c_attn.weight",  # already fused as q, k, v
    "layers.{}.attention.wqkv.bias": "transformer.h.{}.attn.c_attn.bias",
    "layers.{}.attention.wo.weight": "transformer.h.{}.attn.c_proj.weight",
    "layers.{}.feed_forward.w1.weight": "transformer.h.{}.mlp.w2.weight",  # Qwen 1's w2 is the gated (silu) half
    "layers.{}.feed_forward.w3.weight": "transformer.h.{}.mlp.w1.weight",
    "layers.{}.feed_forward.w2.weight": "transformer.h.{}.mlp.c_proj.weight",
    "layers.{}.attention_norm.weight": "transformer.h.{}.ln_1.weight",
    "layers.{}.ffn_norm.weight": "transformer.h.{}.ln_2.weight",
}


def load_hf_weights(folder: Path) -> dict:
    """All tensors of an HF folder: safetensors or .bin, one file or sharded with an index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).exists():
            files = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            break
        if (folder / single).exists():
            files = [single]
            break
    else:
        raise ConvertError(f"no model.safetensors or pytorch_model.bin (or their index) in {folder}")
    weights = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise ConvertError(f"{path} is listed in the index but missing: download the whole checkpoint")
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                weights.update(load_file(str(path)))
            else:
                weights.update(torch.load(str(path), map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:
            raise ConvertError(f"cannot read {path} ({type(e).__name__}): the file is corrupt or incomplete") from e
    return weights


def convert_state_dict(hf: dict, args: ModelArgs, qwen1: bool) -> dict:
    table = QWEN1_NAMES if qwen1 else LLAMA_NAMES
    sd = {}
    for ours, theirs in table.items():
        for i in (range(args.n_layer) if "{}" in ours else [None]):
            src = theirs.format(i) if i is not None else theirs
            if src in hf:
                sd[ours.format(i) if i is not None else ours] = hf[src]
    for i in range(args.n_layer):
        p = f"layers.{i}.attention."
        for kind in ("weight", "bias"):
            parts = [sd.pop(p + w + "." + kind, None) for w in ("wq", "wk", "wv")]
            if all(t is not None for t in parts):
                sd[p + "wqkv." + kind] = torch.cat(parts)
    if args.tie_word_embeddings or "output.weight" not in sd:
        # one tensor under both names: torch.save stores it once
        sd["output.weight"] = sd["tok_embeddings.weight"]
        args.tie_word_embeddings = True
    return sd


def check_complete(sd: dict, args: ModelArgs) -> None:
    from model import Transformer
    with torch.device("meta"):
        expected = Transformer(args).state_dict().keys()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise ConvertError(f"checkpoint does not match its config: missing {missing[:4]}, unexpected {extra[:4]}")


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


@torch.inference_mode()
def convert_hf_checkpoint(checkpoint_dir: Path, output_dir: Path = None, dtype: str = "auto") -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    output_dir = Path(output_dir or checkpoint_dir)
    cfg_path = checkpoint_dir / "config.json"
    if not cfg_path.exists():
        raise ConvertError(f"{cfg_path} not found: point --checkpoint_dir at a Hugging Face model folder")
    cfg = json.loads(cfg_path.read_text())
    args = model_args_from_hf_config(cfg)
    hf = load_hf_weights(checkpoint_dir)
    sd = convert_state_dict(hf, args, qwen1=cfg.get("model_type") == "qwen")
    check_complete(sd, args)
    if dtype != "auto":
        target = getattr(torch, dtype)
        tied = args.tie_word_embeddings
        sd = {k: v.to(target) for k, v in sd.items()}
        if tied:
            sd["output.weight"] = sd["tok_embeddings.weight"]
    output_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(sd, output_dir / "model.pth")
    args.save(output_dir / CONFIG_NAME)
    if output_dir.resolve() != checkpoint_dir.resolve():
        for name in TOKENIZER_FILES:
            if (checkpoint_dir / name).exists():
                (output_dir / name).write_bytes((checkpoint_dir / name).read_bytes())
        if (checkpoint_dir / "original" / "tokenizer.model").exists() and not (output_dir / "tokenizer.model").exists():
            (output_dir / "tokenizer.model").write_bytes((checkpoint_dir / "original" / "tokenizer.model").read_bytes())
    return output_dir / "model.pth"


def main():
    parser = argparse.ArgumentParser(description="Convert a Hugging Face checkpoint folder to model.pth.")
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="HF folder with config.json and weights")
    parser.add_argument("--output_dir", type=Path, default=None, help="where to write (default: checkpoint_dir)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weight dtype to store (auto keeps the checkpoint's)")
    a = parser.parse_args()
    try:
        out = convert_hf_checkpoint(a.checkpoint_dir, a.output_dir, a.dtype)
    except (ConvertError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
