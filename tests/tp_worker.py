# Run by tests/test_tp.py, alone (the 1-process reference) or under torchrun: load a checkpoint, with tensor
# parallelism when launched on several processes, generate from a fixed prompt and save what this rank got.
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as G  # noqa: E402
import tp  # noqa: E402


def run(checkpoint_path, prompt, max_new_tokens=8, batch_size=1, draft_checkpoint_path=None, speculate_k=3,
        temperature=0.0, top_k=None, compile=False, use_tp=False, seed=1234, device="cpu") -> dict:
    """Prefill logits of the last prompt position [B, V] and the generated tokens [B, T + new]."""
    model = G.load_model(checkpoint_path, device, torch.float32, use_tp)
    draft = G.load_model(draft_checkpoint_path, device, torch.float32, use_tp) if draft_checkpoint_path else None
    prompt = torch.tensor(prompt, dtype=torch.int, device=device)
    max_seq = prompt.numel() + max_new_tokens + (G.speculative_room(speculate_k) if draft else 0)
    with torch.device(device):
        model.setup_caches(batch_size, max_seq)
        if draft is not None:
            draft.setup_caches(batch_size, max_seq)
    decode = G.decode_one_token
    if compile:  # True, or a torch.compile mode ("reduce-overhead": CUDA graphs)
        mode = compile if isinstance(compile, str) else None
        G.decode_one_token = torch.compile(G.decode_one_token, mode=mode, fullgraph=True)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            logits = model(prompt.view(1, -1).repeat(batch_size, 1), torch.arange(prompt.numel(), device=device),
                           last_only=True)
        y, stats = G.generate(model, prompt, max_new_tokens, batch_size=batch_size, draft_model=draft,
                              speculate_k=speculate_k, temperature=temperature, top_k=top_k)
    finally:
        G.decode_one_token = decode
    return {"logits": logits[:, -1].cpu(), "tokens": y.cpu(), "accept_counts": stats.get("accept_counts")}


def main(args) -> None:
    rank = tp.maybe_init_dist(args.device)
    if rank is not None:
        tp.quiet_other_ranks(rank)
    if args.fail_rank is not None and rank == args.fail_rank:
        raise RuntimeError(f"rank {rank} failed on purpose")
    jobs = json.loads(args.jobs.read_text())  # {name: keyword arguments of run}, run one after another
    device = f"cuda:{rank or 0}" if args.device == "cuda" else args.device
    out = {name: run(**kwargs, use_tp=rank is not None, device=device) for name, kwargs in jobs.items()}
    torch.save(out, args.out.parent / f"{args.out.name}.rank{rank or 0}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="generate under torchrun for tests/test_tp.py")
    p.add_argument("--jobs", type=Path, required=True, help="JSON {name: keyword arguments of run}")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--fail_rank", type=int, default=None, help="this rank raises right after joining the group")
    p.add_argument("--out", type=Path, required=True, help="each rank writes OUT.rankN: {name: result}")
    try:
        main(p.parse_args())
    except G.UserError as e:
        sys.exit(f"error: {e}")
