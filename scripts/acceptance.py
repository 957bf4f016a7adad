# Speculative decoding acceptance of a draft for a target: generate.generate's per-round counts over a few prompts,
# the mean tokens per round, and the per-token acceptance a that explains them: a round of k drafts yields
# (1 - a^(k+1)) / (1 - a) tokens on average if each draft token is accepted with probability a.
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

QUESTIONS = [
    "Explain how a hash table works and when its lookups become slow.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What were the main causes of the French Revolution?",
    "Give me a step-by-step recipe for a simple tomato soup.",
]
CODE = 'import torch\n\n\ndef attention(q, k, v, mask=None):\n    """Scaled dot-product attention over the last two dims."""\n'


def prompts(tokenizer) -> list:
    chats = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    code = tokenizer.encode(CODE)
    if tokenizer.add_bos and tokenizer.bos_id() is not None:
        code = [tokenizer.bos_id()] + code
    return chats + [code]


def tokens_per_round(a: float, k: int) -> float:
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def acceptance_rate(mean_tokens: float, k: int) -> float:
    """The a in [0, 1] with tokens_per_round(a, k) == mean_tokens (it increases with a), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, k) < mean_tokens else (lo, mid)
    return (lo + hi) / 2


def main(args) -> None:
    target = generate.load_model(args.checkpoint_path, "cpu", torch.float32)
    draft = generate.load_model(args.draft_checkpoint_path, "cpu", torch.float32)
    tokenizer = get_tokenizer(args.checkpoint_path.parent)
    stop_ids = set() if args.ignore_eos else tokenizer.stop_ids()
    k = args.speculate_k
    counts, n_tokens = [0] * (k + 1), 0
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts(tokenizer)):
        torch.manual_seed(args.seed + i)
        prompt = torch.tensor(ids, dtype=torch.int)
        max_seq = prompt.numel() + args.max_new_tokens + k + 1
        target.setup_caches(max_batch_size=1, max_seq_length=max_seq)
        draft.setup_caches(max_batch_size=1, max_seq_length=max_seq)
        y, stats = generate.generate(target, prompt, args.max_new_tokens, draft_model=draft, speculate_k=k,
                                     on_token=lambda step: step[0] in stop_ids, temperature=args.temperature,
                                     top_k=args.top_k)
        counts = [a + b for a, b in zip(counts, stats["accept_counts"])]
        n_tokens += y.size(1) - prompt.numel()
        if args.verbose:
            print(repr(tokenizer.decode(y[0, prompt.numel():].tolist())), stats["accept_counts"], file=sys.stderr)
    rounds = sum(counts)
    mean = sum((i + 1) * c for i, c in enumerate(counts)) / rounds
    print(f"| {args.checkpoint_path.parent.name} | {args.draft_checkpoint_path.name} | "
          f"{'greedy' if args.temperature == 0 else f'T={args.temperature} top_k={args.top_k}'} | {counts} | "
          f"{mean - 1:.2f} | {mean:.2f} | {acceptance_rate(mean, k):.3f} | {n_tokens} | "
          f"{time.perf_counter() - t0:.0f} s |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Acceptance counts of speculative decoding with a draft checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="target model.pth")
    p.add_argument("--draft_checkpoint_path", type=Path, required=True, help="draft checkpoint (same tokenizer)")
    p.add_argument("--speculate_k", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ignore_eos", action="store_true", help="do not stop at the end of a reply")
    p.add_argument("--verbose", action="store_true", help="print each reply and its counts")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
