# GPU check of tensor parallelism: logits of N processes against one process, for tp.py's one-shot all-reduce and for
# NCCL, in bfloat16 and float32, eager and compiled decode (CUDA graphs). The CPU tests cover gloo; this covers the
# CUDA-only paths. Random weights in a small qwen2.5-0.5b-shape model (GQA and q/k/v biases):
#
#   torchrun --standalone --nproc_per_node=2 scripts/tp_check.py
#
# (On a machine without GPUs it runs the same comparison over gloo.) In float32 every variant must match one process to round-off (it prints OK / FAILED); in bfloat16 one-shot and NCCL
# must differ from one process by the same amount (the split sums round differently, whatever the all-reduce).
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as G  # noqa: E402
import tp  # noqa: E402
from model import ModelArgs, Transformer, transformer_configs  # noqa: E402

PROMPT_LEN, STEPS = 8, 6


def logits(model, device, prompt, compiled: bool) -> torch.Tensor:
    """Prefill, then STEPS decode steps fed fixed tokens (so every variant sees the same inputs): [1 + STEPS, V]."""
    model.setup_caches(1, 64)
    step = torch.compile(G.model_forward, mode="reduce-overhead", fullgraph=True) if compiled else G.model_forward
    with torch.no_grad():
        out = [model(prompt, torch.arange(PROMPT_LEN, device=device))[:, -1]]
        for i in range(STEPS):
            tok = prompt[:, i:i + 1]
            out.append(step(model, tok, torch.tensor([PROMPT_LEN + i], device=device))[:, -1].clone())
    return torch.stack(out).float()


def main() -> None:
    on_cuda = torch.cuda.is_available()  # on CPU (gloo) only the NCCL-free path runs: a check of this script
    rank = tp.maybe_init_dist("cuda" if on_cuda else "cpu")
    if rank is None:
        sys.exit("error: run under torchrun with --nproc_per_node 2 or more")
    tp.quiet_other_ranks(rank)
    device = f"cuda:{rank}" if on_cuda else "cpu"
    base = Transformer(ModelArgs(**dict(transformer_configs["qwen2.5-0.5b"], n_layer=4)))
    torch.manual_seed(0)  # the same weights and prompt on every rank
    for name, p in base.named_parameters():
        p.data.fill_(1.0) if "norm" in name else p.data.normal_(0, 0.05)
    prompt = torch.randint(0, 1000, (1, PROMPT_LEN), device=device)
    one_shot_bytes = tp.ONE_SHOT_MAX_BYTES
    failed = False
    for dtype in (torch.bfloat16, torch.float32):
        ref = logits(copy.deepcopy(base).to(device, dtype), device, prompt, compiled=False)
        diffs, outs = {}, {}
        for one_shot in (True, False):
            tp.ONE_SHOT_MAX_BYTES = one_shot_bytes if one_shot else 0
            for compiled in (False, True):
                torch._dynamo.reset()
                model = copy.deepcopy(base)
                tp.apply_tp(model)
                got = logits(model.to(device, dtype), device, prompt, compiled)
                d = (got - ref).abs().max().item()
                diffs[one_shot, compiled], outs[one_shot, compiled] = d, got
                path = "one-shot" if one_shot and tp.one_shot_in_use() and dtype == torch.bfloat16 else \
                    "NCCL" if on_cuda else "gloo"
                print(f"{str(dtype):15} {path:8} {'compiled' if compiled else 'eager':8} max |logit - one process| "
                      f"{d:.3e} (logits up to {ref.abs().max().item():.2f})", flush=True)
        if dtype == torch.float32:
            ok = max(diffs.values()) < 1e-4
        else:  # one-shot against NCCL: no further from NCCL than TP's own bf16 rounding takes NCCL from one process
            ok = all((outs[True, c] - outs[False, c]).abs().max().item() <= max(diffs[False, c], 1e-2)
                     for c in (False, True))
        failed |= not ok
        print(f"{dtype}: {'OK' if ok else 'FAILED'}", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
