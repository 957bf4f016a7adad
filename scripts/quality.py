# Quantization quality: token perplexity of a float checkpoint and of its int8, int4 (round to nearest) and GPTQ
# copies, on held-out Wikipedia text, as a markdown table. GPTQ calibrates on the "calibration" half of the summaries
# and perplexity is measured on the "eval" half (quantize.wiki_texts), so they share no text; the script checks it.
# Everything runs in float32 on the CPU, and int4 layers take the reference path (dequantize, then F.linear in
# float32) instead of the bfloat16 CPU kernel, so the table shows the schemes' own error (--packed for the kernel).
import argparse
import math
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev  # noqa: E402
import generate  # noqa: E402
import quantize  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

# name -> (quantize.py mode, groupsize); None is the float checkpoint itself
SCHEMES = {"float": None, "int8": ("int8", None), "int4-g32": ("int4", 32), "int4-g128": ("int4", 128),
           "gptq-g128": ("int4-gptq", 128), "gptq-g32": ("int4-gptq", 32)}


def is_current(path: Path, mode: str, groupsize, head: str) -> bool:
    """Whether a quantized file already there is what quantize.py writes now for these options: a file from before
    int4 files kept their head in int8 (format 1) must not stand in for one."""
    meta = torch.load(str(path), mmap=True, weights_only=True).get("quantization")
    if not isinstance(meta, dict) or meta.get("format") != quantize.FORMAT:
        return False
    return (meta.get("groupsize"), meta.get("method"), meta["layers"].get("output", {}).get("mode")) == \
        (groupsize, "gptq" if mode == "int4-gptq" else "rtn", head)


def make_checkpoint(path: Path, scheme: str, args, tokenizer) -> Path:
    """The checkpoint of a scheme, quantized with quantize.py's functions unless it is already there."""
    if SCHEMES[scheme] is None:
        return path
    mode, groupsize = SCHEMES[scheme]
    head = "int8" if mode == "int8" else args.head
    out = quantize.output_path_for(path, mode, groupsize, head)
    if out.is_file() and not args.force:
        if is_current(out, mode, groupsize, head):
            print(f"{scheme}: using the existing {out}", file=sys.stderr)
            return out
        print(f"{scheme}: {out} was written by an older quantize.py or with other options: quantizing again",
              file=sys.stderr)
    calibration = None
    if mode == "int4-gptq":
        texts = quantize.wiki_texts("calibration")
        calibration = quantize.calibration_tokens(tokenizer, texts, args.calibration_samples,
                                                  args.calibration_seq_length)
    t0 = time.perf_counter()
    quantize.quantize_checkpoint(path, mode, groupsize, calibration=calibration, head=head, percdamp=args.percdamp,
                                 act_order=args.act_order, log=lambda s: print(s, file=sys.stderr))
    print(f"{scheme}: wrote {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def load(path: Path, packed: bool):
    if packed:
        return generate.load_model(path, "cpu", torch.float32)
    with mock.patch.object(quantize, "pack_for_device", lambda model: model):  # keep int4 on the float32 path
        return generate.load_model(path, "cpu", torch.float32)


def main(args) -> None:
    path = args.checkpoint_path
    name = path.parent.name
    tokenizer = get_tokenizer(path.parent)
    docs = ev.default_documents()[:args.docs]
    assert not set(docs) & set(quantize.wiki_texts("calibration")), "the eval text overlaps the calibration text"
    tokens = ev.encode_documents(tokenizer, docs)
    stride = args.stride or args.window
    settings = (f"{name}: {len(docs)} documents of the eval half of the Wikipedia summaries ({tokens.numel()} tokens), "
                f"windows of {args.window} tokens, stride {stride}; float32 on CPU, int4 "
                f"{'through the bfloat16 CPU kernel' if args.packed else 'dequantized to float32'}, the output head "
                f"of int4 files in {args.head}; GPTQ: "
                f"{args.calibration_samples} x {args.calibration_seq_length} tokens of the calibration half, damping "
                f"{args.percdamp}{', act order' if args.act_order else ''}")
    print(settings, file=sys.stderr)
    rows = {}
    for scheme in args.schemes:
        ckpt = make_checkpoint(path, scheme, args, tokenizer)
        t0 = time.perf_counter()
        model = load(ckpt, args.packed)
        r = ev.evaluate_perplexity(model, tokenizer, docs, args.window, stride)
        del model
        rows[scheme] = (r["token_perplexity"], ckpt.stat().st_size / 1e6)
        print(f"{scheme}: ppl {r['token_perplexity']:.4f} over {r['tokens']} tokens in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    print(f"\n{settings}\n")
    print("| model | scheme | ppl | change vs float (%) | checkpoint MB |")
    print("|---|---|---|---|---|")
    base = rows.get("float", (math.nan,))[0]
    for scheme, (ppl, mb) in rows.items():
        print(f"| {name} | {scheme} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} | {mb:.0f} |")
    for g in (128, 32):
        if {"float", f"int4-g{g}", f"gptq-g{g}"} <= rows.keys():
            rtn, gptq = rows[f"int4-g{g}"][0], rows[f"gptq-g{g}"][0]
            print(f"\nGPTQ g{g} closes {100 * (rtn - gptq) / (rtn - base):.0f}% of round-to-nearest g{g}'s gap "
                  f"({rtn - base:+.3f} -> {gptq - base:+.3f} ppl)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Perplexity of a checkpoint and its quantized copies (made if missing).")
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"))
    p.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES)[:5])
    p.add_argument("--docs", type=int, default=40, help="documents of the held-out half to score")
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default: the window)")
    p.add_argument("--packed", action="store_true", help="run int4 through the CPU kernel, as generate.py does")
    p.add_argument("--head", choices=quantize.HEADS, default="int8",
                   help="the output head of int4 files (quantize.py --head); int4 reproduces the files made before")
    p.add_argument("--force", action="store_true", help="quantize again even if the checkpoint exists")
    p.add_argument("--calibration_samples", type=int, default=32)
    p.add_argument("--calibration_seq_length", type=int, default=512)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--act_order", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
