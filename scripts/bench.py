# Decode speed on random weights in real model shapes (decode speed does not depend on the values).
# Prints tokens/s, steady ms/token, bytes read per token, GB/s and the share of the GPU's copy bandwidth
# measured in the same run, time to first token and compile times, then a compact table.
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import generate as G  # noqa: E402
from model import ModelArgs, Transformer, merge_gate_up, transformer_configs  # noqa: E402

EAGER_DECODE, EAGER_PREFILL, EAGER_VERIFY = G.decode_one_token, G.prefill, G.verify
SAMPLING = dict(temperature=0.8, top_k=200)  # generate.py's defaults


def sync(device):
    G.device_sync(device)


def copy_bandwidth(device, nbytes=2 << 30, iters=20) -> float:
    """Device-to-device copy, bytes read plus bytes written, in GB/s."""
    if "cuda" not in str(device):
        return float("nan")
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def random_model(name: str, mode: str, device, dtype, workdir: Path, use_tp: bool = False,
                 merge: bool = True) -> Transformer:
    """Random weights in the shape of `name`. Quantized modes go through the real files: save the float model,
    quantize it with quantize.py, load the result with generate.load_model. Under torchrun (use_tp) the model is
    sharded while it is still on the meta device, so each GPU only ever holds its own shard. merge: bf16 gate and
    up as one matrix on CUDA, as generate.load_model does (not for a model to be saved)."""
    args = ModelArgs.from_name(name)
    with torch.device("meta"):
        model = Transformer(args)
    if use_tp:
        if mode != "bf16":
            raise ValueError("under torchrun the benchmark runs bf16 only")
        import tp
        tp.apply_tp(model)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    if args.tie_word_embeddings and not use_tp:  # under TP the head is a vocabulary shard of its own
        model.output.weight = model.tok_embeddings.weight
    if mode == "bf16":
        return (merge_gate_up(model) if merge and model.tok_embeddings.weight.is_cuda else model).eval()
    path = random_checkpoint(name, mode, device, workdir, model)
    del model
    return G.load_model(path, device, dtype)


def random_checkpoint(name: str, mode: str, device, workdir: Path, model: Optional[Transformer] = None) -> Path:
    """The file of `name`'s random weights in `mode` under workdir: model.pth (bf16) saved from model (made here
    when None), quantized from it with quantize.py. The weights are seeded, so a file of an earlier run holds the
    same ones and is reused."""
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.pth").exists():
        model = model if model is not None else random_model(name, "bf16", device, torch.bfloat16, workdir,
                                                             merge=False)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, str(folder / "model.pth"))
        model.config.save(folder / "model_config.json")
    if mode == "bf16":
        return folder / "model.pth"
    import quantize
    kind, _, gs = mode.partition("-g")
    path = quantize.output_path_for(folder / "model.pth", kind, int(gs) if gs else None, "int8")
    if not path.exists():
        path = quantize.quantize_checkpoint(folder / "model.pth", kind, int(gs) if gs else None, device=device,
                                            log=lambda *a: None)
    return path


def first_token_s(ckpt: Path, tokenizer: Path, device: str, cache_dir: Path, prompt="Hello, my name is") -> float:
    """Seconds from starting `python generate.py --compile` on ckpt (the user's command: a text prompt, 200 new
    tokens after a compiling warm-up sample of generate.WARMUP_TOKENS) to the first character of its new text, with
    inductor's and Triton's caches in cache_dir: empty for a cold start, filled by an earlier call for a warm one.
    Random weights may give ids past the tokenizer's vocabulary, which print nothing, so the first visible character
    can come a few tokens late (milliseconds)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir / "inductor"),
               TRITON_CACHE_DIR=str(cache_dir / "triton"))
    if env.pop("PYTHONDONTWRITEBYTECODE", None):  # a Python that keeps no bytecode (the GPU machine's, read-only)
        # compiles torch's sources at every start (~9 s of a warm start there): cache it with the compile caches, as
        # an ordinary install has it
        env["PYTHONPYCACHEPREFIX"] = str(cache_dir / "pyc")
    cmd = [sys.executable, str(REPO / "generate.py"), "--checkpoint_path", str(ckpt), "--tokenizer_path",
           str(tokenizer), "--device", device, "--compile", "--prompt", prompt, "--num_samples", "1", "--ignore_eos"]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        out, first = b"", None
        while chunk := os.read(proc.stdout.fileno(), 4096):  # the prompt is echoed first, then the text as it comes
            out += chunk
            if first is None and len(out.decode(errors="replace")) > len(prompt):
                first = time.perf_counter() - t0
        err.seek(0)
        log = err.read().decode(errors="replace")
        if proc.wait() != 0 or first is None:
            raise RuntimeError(f"generate.py failed (exit {proc.returncode}): {log[-300:]}")
    steps = [line for line in log.splitlines() if line.startswith(("Loaded the model", "Compilation time"))]
    print(f"  generate.py: first text after {first:.1f} s ({'; '.join(steps)})", flush=True)
    return first


def first_token_cold_warm(name: str, mode: str, device: str, workdir: Path, tokenizer: Path) -> tuple:
    """first_token_s with empty compile caches, then again with the caches that run filled."""
    torch._dynamo.reset()  # let go of this process's compiled graphs and their GPU memory first
    if "cuda" in device:
        torch.cuda.empty_cache()
    ckpt = random_checkpoint(name, mode, device, workdir)
    with tempfile.TemporaryDirectory(dir=workdir) as cache:
        return tuple(first_token_s(ckpt, tokenizer, device, Path(cache)) for _ in range(2))


def kv_bytes_per_token(model: Transformer, filled: float) -> float:
    """K and V bytes attention really needs at a mean filled length (not the whole allocated cache)."""
    a = model.layers[0].attention
    elt = model.layers[0].attention.kv_cache.k_cache.element_size()
    return 2 * len(model.layers) * a.n_local_heads * a.head_dim * filled * elt


def compile_fns(compile: bool, compile_prefill: bool) -> None:
    G.decode_one_token = torch.compile(EAGER_DECODE, mode="reduce-overhead", fullgraph=True) \
        if compile else EAGER_DECODE
    G.prefill = torch.compile(EAGER_PREFILL, fullgraph=True, dynamic=True) \
        if compile and compile_prefill else EAGER_PREFILL


def bench_one(name, mode, prompt_len, new_tokens, batch_size, device, dtype, compile, copy_bw, warm_compile=False,
              profile=False, repeats=3, workdir=Path("/tmp/bench_ckpt"), world_size=1, cache_length=None,
              compile_prefill=True):
    torch._dynamo.reset()
    model = random_model(name, mode, device, dtype, workdir, use_tp=world_size > 1)
    max_seq = max(cache_length or 0, prompt_len + new_tokens)
    with torch.device(device):
        model.setup_caches(batch_size, max_seq)
    compile_fns(compile, compile_prefill)
    prompt = torch.randint(0, 1000, (prompt_len,), device=device, dtype=torch.int)

    def run(n=new_tokens):
        sync(device)
        t0 = time.perf_counter()
        y, _ = G.generate(model, prompt, n, batch_size=batch_size, **SAMPLING)
        sync(device)
        return time.perf_counter() - t0, y

    def run_n(n):
        return run(n)[0]

    print(f"  {name} {mode}: model ready, compiling", flush=True)
    t_compile, _ = run()  # compiles prefill and decode (cold unless the inductor cache is warm)
    walls = []
    for _ in range(repeats):
        t, y = run()
        walls.append(t)
    wall = sorted(walls)[len(walls) // 2]
    n_new = y.size(1) - prompt_len
    # time to first token: the same generate with one new token; steady decode from the difference
    ttft = sorted(run_n(1) for _ in range(repeats))[repeats // 2]
    ms_tok = (wall - ttft) / (n_new - 1) * 1e3
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_n(20)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90), flush=True)
    t_compile2 = None
    if compile and warm_compile:  # warm: throw away dynamo's state, recompile from inductor's on-disk cache
        torch._dynamo.reset()
        compile_fns(compile, compile_prefill)
        t_compile2, _ = run()
    weight_bytes = G.model_size_bytes(model)
    tok_bytes = weight_bytes + batch_size * kv_bytes_per_token(model, prompt_len + new_tokens / 2)
    gbs = tok_bytes / (ms_tok / 1e3) / 1e9
    if world_size > 1:
        import tp
        world_size = f"{world_size} ({'one-shot' if tp.one_shot_in_use() else 'NCCL'})"
    row = dict(model=name, mode=mode, tp=world_size, prompt=prompt_len, cache=model.max_seq_length, new=n_new,
               batch=batch_size, prefill="compiled" if compile and compile_prefill else "eager",
               tok_s=n_new * batch_size / wall, ms_tok=ms_tok, gb_tok=tok_bytes / 1e9, gbs=gbs,
               pct=100 * gbs / copy_bw, ttft_ms=ttft * 1e3, compile_s=t_compile, compile_warm_s=t_compile2,
               limit_tok_s=copy_bw * 1e9 / tok_bytes)
    return row


def all_reduce_us(device, dim: int, one_shot: bool = False, n: int = 200) -> float:
    """One all-reduce of a token's hidden state (dim bf16 values), as the two per layer under TP, in a CUDA graph:
    NCCL, or tp.py's one-shot all-reduce over symmetric memory."""
    import torch.distributed as dist
    import tp
    x = torch.ones(1, 1, dim, dtype=torch.bfloat16, device=device)
    if one_shot:
        reduce = tp._all_reduce_hook(dist.group.WORLD.group_name)  # the hook tp.py puts after wo and w2
        if not tp.one_shot_in_use():
            return float("nan")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = reduce(None, None, x) if one_shot else dist.all_reduce(x)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    if one_shot and not torch.equal(y, x * dist.get_world_size()):
        raise RuntimeError("one-shot all-reduce gave a wrong sum")
    with torch.cuda.graph(graph):
        for _ in range(n):
            reduce(None, None, x) if one_shot else dist.all_reduce(x)
    graph.replay()
    sync(device)
    t0 = time.perf_counter()
    graph.replay()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e6


@torch.no_grad()
def step_ms(model, device, k, n=50, with_probs=False, with_verify=True, seqlen=1):
    """Steady ms of one compiled decode step (reading seqlen tokens) and of one verify step (a (k + 1)-token forward
    and the acceptance arithmetic, generate.verify; nan unless with_verify), at position 16. with_probs: the decode
    step also returns the token's distribution, as a speculative draft's does (its first step of a round reads two
    tokens)."""
    decode = torch.compile(EAGER_DECODE, mode="reduce-overhead", fullgraph=True, dynamic=False)
    verify = torch.compile(EAGER_VERIFY, mode="reduce-overhead", fullgraph=True)
    x1 = torch.zeros(1, seqlen, dtype=torch.int, device=device)
    pos1 = torch.arange(17 - seqlen, 17, device=device)
    xk, posk = torch.zeros(1, k + 1, dtype=torch.int, device=device), torch.arange(16, 17 + k, device=device)
    # a draft's distributions as sample returns them (top-k values and ids): uniform over the first k ids
    draft_p, draft_ids = G.top_k_probs(torch.zeros(k, model.config.vocab_size, device=device), **SAMPLING)
    out = [float("nan")] * 2
    steps = ((decode, (model, x1, pos1, with_probs)), (verify, (model, xk, posk, draft_p, draft_ids)))
    for i, (fn, args) in enumerate(steps[:2 if with_verify else 1]):
        for _ in range(3):
            fn(*args, **SAMPLING)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args, **SAMPLING)
        sync(device)
        out[i] = (time.perf_counter() - t0) / n * 1e3
    return out


def bench_speculative(name, draft, k, device, dtype, workdir, acceptances=(0.6, 0.7, 0.8, 0.9), new_tokens=200,
                      prompt_len=5, e2e=True):
    """Step times of the target, the draft and the verify; the speedup they predict at a per-token acceptance a:
    a round yields (1 - a^(k+1)) / (1 - a) tokens and costs k draft steps (the first reads two tokens) plus one
    verify. Then generate.py's own speculative loop end to end (compiled as `generate.py --compile` compiles it):
    ms per new token and the mean tokens per round at the acceptance these random weights give, against what the
    step times predict for it (unless not e2e)."""
    torch._dynamo.reset()
    target = random_model(name, "bf16", device, dtype, workdir)
    target.setup_caches(1, 64)
    t_plain, t_verify = step_ms(target, device, k)
    torch._dynamo.reset()
    shape, _, mode = draft.partition(":")  # the target's own quantized copy, or another shape (":mode" stored so)
    dmodel = random_model(name, shape, device, dtype, workdir) if shape in ("int8", "int4-g32", "int4-g128") \
        else random_model(shape, mode or "bf16", device, dtype, workdir)
    dmodel.setup_caches(1, 64)
    t_draft, _ = step_ms(dmodel, device, k, with_probs=True, with_verify=False)
    t_first, _ = step_ms(dmodel, device, k, with_probs=True, with_verify=False, seqlen=2)
    t_round = t_first + (k - 1) * t_draft + t_verify
    row = dict(model=name, draft=draft, k=k, plain_ms=t_plain, draft_ms=t_draft, draft_first_ms=t_first,
               verify_ms=t_verify, verify_over_plain=t_verify / t_plain)
    for a in acceptances:
        tokens = (1 - a ** (k + 1)) / (1 - a)
        row[f"speedup@{a}"] = tokens * t_plain / t_round
    if not e2e:
        return row

    torch._dynamo.reset()
    # static shapes: a draft step reads one token, or two at the start of a round
    G.decode_one_token = torch.compile(EAGER_DECODE, mode="reduce-overhead", fullgraph=True, dynamic=False)
    G.verify = torch.compile(EAGER_VERIFY, mode="reduce-overhead", fullgraph=True)
    G.prefill = EAGER_PREFILL
    with torch.device(device):
        for m in (target, dmodel):
            m.setup_caches(1, prompt_len + new_tokens + G.speculative_room(k))
    prompt = torch.randint(0, 1000, (prompt_len,), device=device, dtype=torch.int)

    def run(n):
        sync(device)
        t0 = time.perf_counter()
        y, stats = G.generate(target, prompt, n, draft_model=dmodel, speculate_k=k, **SAMPLING)
        sync(device)
        return time.perf_counter() - t0, stats["accept_counts"]

    run(new_tokens)  # compiles
    short, long = run(new_tokens // 4), run(new_tokens)  # the difference leaves out prefill and the first rounds
    counts = [c1 - c0 for c0, c1 in zip(short[1], long[1])]  # the rounds the longer run adds, by tokens accepted
    tokens = sum((i + 1) * c for i, c in enumerate(counts))  # counted before generate cuts at max_new_tokens
    ms_tok = (long[0] - short[0]) / max(1, tokens) * 1e3
    per_round = tokens / max(1, sum(counts))
    row.update(e2e_ms_per_token=ms_tok, e2e_tokens_per_round=per_round,
               e2e_predicted_ms_per_token=t_round / per_round, e2e_speedup=t_plain / ms_tok)
    G.decode_one_token, G.verify = EAGER_DECODE, EAGER_VERIFY
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["llama-2-7b"], choices=list(transformer_configs))
    p.add_argument("--modes", nargs="+", default=["bf16"], help="bf16, int8, int4-g32, int4-g128")
    p.add_argument("--prompt_length", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--warm_compile", action="store_true", help="also time a recompile from the warm inductor cache")
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of 20 decode steps")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="inductor config overrides to compare, e.g. coordinate_descent_tuning=True")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ckpt"),
                   help="random checkpoints for quantized modes and --first_token")
    p.add_argument("--speculate", nargs="*", default=[], metavar="DRAFT",
                   help="time speculative decoding instead, with these drafts: a model shape (SHAPE:int8-head for its "
                        "head in int8), or int8 / int4-g32 (the target's own quantized copy)")
    p.add_argument("--speculate_k", type=int, default=4)
    p.add_argument("--speculate_steps_only", action="store_true",
                   help="time the steps only, not generate.py's speculative loop end to end")
    p.add_argument("--one_shot_max_bytes", type=int, default=None,
                   help="under torchrun: largest all-reduce that takes tp.py's one-shot path (0: NCCL only)")
    p.add_argument("--eager_prefill", action="store_true",
                   help="compile decode only, as generate.py --compile does without --compile_prefill")
    p.add_argument("--cache_length", type=int, default=None,
                   help="allocate the KV cache for this many tokens (generate.py --interactive allocates 8192)")
    p.add_argument("--attention", choices=["auto", "sdpa"], default="auto",
                   help="sdpa: decode with SDPA even where model.py's Triton decode attention applies")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--first_token", action="store_true",
                   help="also time `generate.py --compile` from process start to its first new text, with empty "
                        "compile caches and again with them filled (each row's checkpoint saved under --workdir)")
    p.add_argument("--tokenizer", type=Path, default=REPO / "checkpoints/SmolLM2-135M-Instruct",
                   help="tokenizer for --first_token (random weights: any tokenizer encodes the prompt)")
    a = p.parse_args()
    dtype = torch.bfloat16
    world_size = 1
    if "LOCAL_RANK" in os.environ:  # torchrun: tensor parallel, rank 0 prints
        import tp
        if a.one_shot_max_bytes is not None:
            tp.ONE_SHOT_MAX_BYTES = a.one_shot_max_bytes
        rank = tp.maybe_init_dist(a.device)
        if rank is not None:
            world_size = int(os.environ["WORLD_SIZE"])
            a.device = f"cuda:{rank}" if "cuda" in a.device else a.device
            tp.quiet_other_ranks(rank)
    if a.attention == "sdpa":
        import model
        model.use_decode_attention_rope = lambda qkv, head_dim: False
    bw = copy_bandwidth(a.device)
    dev_name = torch.cuda.get_device_name() if "cuda" in a.device else "cpu"
    print(f"device {dev_name}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s", flush=True)
    if world_size > 1 and "cuda" in a.device:
        for name in a.models:
            cfg = ModelArgs.from_name(name)
            for one_shot in (False, True):
                us = all_reduce_us(a.device, cfg.dim, one_shot)
                print(f"tp {world_size}: all-reduce of one {name} hidden state by "
                      f"{'one-shot over symmetric memory' if one_shot else 'NCCL'} {us:.1f} us, two per layer: "
                      f"{2 * cfg.n_layer * us / 1e3:.2f} ms per token", flush=True)
    for kv in a.inductor:
        key, val = kv.split("=", 1)
        obj = torch._inductor.config
        *path, last = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, json.loads(val.lower()) if val.lower() in ("true", "false") else json.loads(val))
        print(f"inductor: {key} = {val}", flush=True)
    rows = []
    for name in a.models:
        for draft in a.speculate:
            try:
                row = bench_speculative(name, draft, a.speculate_k, a.device, dtype, a.workdir,
                                        new_tokens=a.max_new_tokens, prompt_len=a.prompt_length,
                                        e2e=not a.speculate_steps_only)
            except Exception as e:
                print(f"{name} draft {draft}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(json.dumps(row), flush=True)
        for mode in a.modes if not a.speculate else []:
            try:
                row = bench_one(name, mode, a.prompt_length, a.max_new_tokens, a.batch_size, a.device, dtype,
                                not a.no_compile, bw, a.warm_compile, a.profile,
                                workdir=a.workdir, world_size=world_size, cache_length=a.cache_length,
                                compile_prefill=not a.eager_prefill)
            except Exception as e:  # keep going: one failing configuration must not lose the others
                print(f"{name} {mode}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            row.update(first_token_cold_s=None, first_token_warm_s=None)
            if a.first_token:
                try:
                    row.update(zip(("first_token_cold_s", "first_token_warm_s"),
                                   first_token_cold_warm(name, mode, a.device, a.workdir, a.tokenizer)))
                except Exception as e:
                    print(f"{name} {mode}: first token FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(dict(device=dev_name, torch=torch.__version__, copy_gbs=bw, rows=rows), indent=1))
    print("\n| model | mode | tp | prompt | tok/s | ms/tok | GB/tok | GB/s | % copy bw | limit tok/s | TTFT ms | "
          "compile s (cold/warm) | first token s (cold/warm) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def secs(v):
        return "-" if v is None else f"{v:.0f}"
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['tp']} | {r['prompt']} | {r['tok_s']:.1f} | {r['ms_tok']:.2f} | "
              f"{r['gb_tok']:.2f} | {r['gbs']:.0f} | {r['pct']:.0f}% | {r['limit_tok_s']:.0f} | {r['ttft_ms']:.1f} | "
              f"{secs(r['compile_s'])}/{secs(r['compile_warm_s'])} | "
              f"{secs(r['first_token_cold_s'])}/{secs(r['first_token_warm_s'])} |")


if __name__ == "__main__":
    main()
