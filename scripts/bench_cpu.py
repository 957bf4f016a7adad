# CPU decode speed of the default model against transformers on the same weights, in one run: transformers'
# generate with its defaults, transformers with a static cache and torch.compile, and ours (eager and compiled).
# Greedy, float32, a fixed number of new tokens (end of text ignored), median of a few runs after a warm-up.
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as G  # noqa: E402
import offline_models  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[len(walls) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", choices=list(offline_models.MODELS))
    p.add_argument("--prompt", default="The three primary colours are")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_hf_compile", action="store_true", help="leave out transformers + torch.compile (slow)")
    a = p.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    ckpt = offline_models.prepare(a.model)
    gguf = offline_models.gguf_path(a.model)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    ids = tok(a.prompt, return_tensors="pt").input_ids
    n = a.max_new_tokens
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    rows = []

    def hf_run():
        with torch.no_grad():
            return hf.generate(ids, **kw)

    def row(name, fn):
        rows.append((name, timed(fn, a.repeats)))
        print(f"{name}: {n / rows[-1][1]:.1f} tok/s", flush=True)

    row("transformers generate, defaults", hf_run)
    ref = hf_run()[0, ids.size(1):].tolist()

    model = G.load_model(ckpt / "model.pth", "cpu", torch.float32)
    model.setup_caches(1, ids.size(1) + n + 8)
    prompt = ids[0].to(torch.int)

    def ours():
        return G.generate(model, prompt, n, temperature=0)[0]

    row("ours, eager", ours)
    same = {"eager": ours()[0, ids.size(1):].tolist() == ref}
    G.decode_one_token = torch.compile(G.decode_one_token, mode="reduce-overhead", fullgraph=True)
    row("ours, --compile", ours)
    same["compiled"] = ours()[0, ids.size(1):].tolist() == ref
    print("greedy tokens equal to transformers':", same, flush=True)

    if not a.skip_hf_compile:  # last: its compile is the slow part of the run
        hf.generation_config.cache_implementation = "static"
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
        row("transformers generate, static cache + torch.compile", hf_run)

    print(f"\n{a.model}, prompt {ids.size(1)} tokens, {n} new tokens, greedy, float32 (median of {a.repeats})")
    print("\n| implementation | tok/s | vs transformers defaults |\n|---|---|---|")
    for name, wall in rows:
        print(f"| {name} | {n / wall:.1f} | {rows[0][1] / wall:.2f}x |")


if __name__ == "__main__":
    main()
