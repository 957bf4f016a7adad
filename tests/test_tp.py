# tp.py: N processes under torchrun (gloo, CPU, float32) generate what one process generates, on every architecture
# variant, batch size 2, GQA with fewer kv heads than processes, speculative decoding, compiled decoding, quantized
# checkpoints and the two real models; and a bad split or a crashing rank ends the run with a message, not a hang.
# The reference is this project's own model in one process, which test_model.py checks against transformers.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tp_worker
from conftest import ROOT, VARIANTS, build_variant, randomize_
from model import CONFIG_NAME, ModelArgs, Transformer

WORKER = Path(tp_worker.__file__)
LAUNCH_TIMEOUT = 600  # seconds; a hang fails the test instead of the suite
PROMPT = [3, 17, 42, 7, 99]
# "The quick brown fox jumps over the lazy dog." in each real model's tokenizer
QWEN_PROMPT = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]
SMOLLM_PROMPT = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]
GQA = ["llama3", "qwen2", "qwen3"]  # 4 q heads, 2 kv heads: 4 processes must copy kv heads
QUANTIZED = ["int8", "int4", "int4_head"]  # int4 files mix an int8 head with int4 blocks; int4_head: --head int4


def torchrun(n: int, script: Path, args: list, tmp: Path, timeout: int = LAUNCH_TIMEOUT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(script)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launch(n: int, jobs: dict, tmp: Path, **kw) -> list:
    """Run the jobs ({name: tp_worker.run keyword arguments}) on n processes; returns each rank's {name: result}."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    done = torchrun(n, WORKER, ["--jobs", tmp / "jobs.json", "--out", tmp / "out"], tmp, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp / f"out.rank{r}") for r in range(n)]


def reference(jobs: dict) -> dict:
    return {name: tp_worker.run(**kwargs) for name, kwargs in jobs.items()}


def assert_same(got: dict, ref: dict, atol: float = 1e-4) -> None:
    assert torch.equal(got["tokens"], ref["tokens"]), f"{got['tokens'].tolist()} != {ref['tokens'].tolist()}"
    torch.testing.assert_close(got["logits"], ref["logits"], atol=atol, rtol=0)
    assert got["accept_counts"] == ref["accept_counts"]


def random_checkpoint(folder: Path, **shape) -> Path:
    """Our own model with random weights, for shapes no variant has (any vocabulary, wide feed-forward)."""
    args = ModelArgs(**shape)
    torch.manual_seed(0)
    model = Transformer(args)
    randomize_(model, seed=1)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pth")
    args.save(folder / CONFIG_NAME)
    return folder / "model.pth"


SHAPE = dict(block_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128)


def real_model(name: str):
    """The converted checkpoint of an offline model (installed from its pip packages once)."""
    from scripts.offline_models import prepare
    return prepare(name) / "model.pth"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {name: build_variant(name, root)[1] / "model.pth" for name in VARIANTS}
    out["odd_vocab"] = random_checkpoint(root / "odd_vocab", vocab_size=322, **SHAPE)  # 322 % 4: head left whole
    wide = random_checkpoint(root / "wide", vocab_size=320, **SHAPE)  # 128 / 2 columns of w2: whole int4 groups
    import quantize
    out["int8"] = quantize.quantize_checkpoint(wide, "int8", log=lambda *a: None)
    out["int4"] = quantize.quantize_checkpoint(wide, "int4", groupsize=32, log=lambda *a: None)  # int8 head
    out["int4_head"] = quantize.quantize_checkpoint(wide, "int4", groupsize=32, head="int4", log=lambda *a: None)
    return out


# ---------------------------------------------------------------------------------------------------- 2 processes

@pytest.fixture(scope="module")
def qwen():
    return real_model("Qwen2.5-Coder-0.5B-Instruct")


@pytest.fixture(scope="module")
def two(ckpts, qwen, tmp_path_factory):
    jobs = {name: dict(checkpoint_path=str(ckpts[name]), prompt=PROMPT, max_new_tokens=10, batch_size=2)
            for name in VARIANTS}
    jobs["speculative"] = dict(checkpoint_path=str(ckpts["llama3"]), draft_checkpoint_path=str(ckpts["qwen2"]),
                               prompt=PROMPT, max_new_tokens=16, speculate_k=3)
    jobs["sampled"] = dict(checkpoint_path=str(ckpts["qwen2"]), prompt=PROMPT, max_new_tokens=10, batch_size=2,
                           temperature=1.0, top_k=50)
    jobs["compiled"] = dict(checkpoint_path=str(ckpts["qwen3"]), prompt=PROMPT, max_new_tokens=10, batch_size=2,
                            compile=True)
    for mode in QUANTIZED:
        jobs[mode] = dict(checkpoint_path=str(ckpts[mode]), prompt=PROMPT, max_new_tokens=10, batch_size=2)
    # 14 q heads, 2 kv heads
    jobs["qwen2.5-0.5b"] = dict(checkpoint_path=str(qwen), prompt=QWEN_PROMPT, max_new_tokens=8, batch_size=2)
    greedy = {k: v for k, v in jobs.items() if k != "sampled"}
    return launch(2, jobs, tmp_path_factory.mktemp("two")), reference(greedy)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_processes_match_one(two, name):
    ranks, ref = two
    for got in ranks:
        assert_same(got[name], ref[name])
    assert len(set(ref[name]["tokens"][0, len(PROMPT):].tolist())) > 2, "degenerate output proves little"


def test_speculative_decoding_under_tp(two):
    ranks, ref = two
    counts = ref["speculative"]["accept_counts"]
    assert sum(counts[:-1]) > 0, "the draft was never rejected: the test would not exercise the rejection path"
    for got in ranks:
        assert_same(got["speculative"], ref["speculative"])


def test_compiled_decode_under_tp(two):
    ranks, ref = two
    for got in ranks:
        assert_same(got["compiled"], ref["compiled"])


@pytest.mark.parametrize("mode", QUANTIZED)
def test_quantized_checkpoints_under_tp(ckpts, two, mode):
    from generate import load_model
    model = load_model(ckpts[mode], "cpu", torch.float32)
    head = type(model.output).__name__  # the head that TP splits by vocabulary
    assert head == ("WeightOnlyInt4Linear" if mode == "int4_head" else "WeightOnlyInt8Linear")
    ranks, ref = two
    if mode == "int8":  # float32 throughout: the same tokens, logits within 1e-4
        for got in ranks:
            assert_same(got[mode], ref[mode])
        return
    # aten's CPU int4 kernel works at about bfloat16 precision (its error against the float32 dequantized product is
    # that of rounding the input to bfloat16), so splitting K across ranks moves the logits by a few hundredths
    # (measured up to 0.031). Greedy texts then agree up to the first step where the reference's two best tokens
    # are that close: there either may win.
    r = ref[mode]["tokens"]
    for got in ranks:
        torch.testing.assert_close(got[mode]["logits"], ref[mode]["logits"], atol=0.1, rtol=0)
        g = got[mode]["tokens"]
        if torch.equal(g, r):
            continue
        j = int((g != r).any(0).int().argmax())  # the first step where a row parted
        assert torch.equal(g[:, :j], r[:, :j]) and j >= len(PROMPT)
        model.setup_caches(r.size(0), j)
        with torch.no_grad():
            best = model(r[:, :j], torch.arange(j))[:, -1].topk(2).values
        assert (best[:, 0] - best[:, 1] < 0.2).all(), f"step {j}: {g.tolist()} != {r.tolist()}, no near tie"


def test_real_qwen_on_two_processes(two, qwen):
    ranks, ref = two
    for got in ranks:
        assert_same(got["qwen2.5-0.5b"], ref["qwen2.5-0.5b"])


def test_sampling_agrees_across_ranks(two):
    # every rank samples for itself from the same seed: the logits must be the same to the bit, or ranks diverge
    ranks, _ = two
    assert torch.equal(ranks[0]["sampled"]["tokens"], ranks[1]["sampled"]["tokens"])
    assert torch.equal(ranks[0]["sampled"]["logits"], ranks[1]["sampled"]["logits"])


# ---------------------------------------------------------------------------------------------------- 4 processes

@pytest.fixture(scope="module")
def four(ckpts, tmp_path_factory):
    jobs = {name: dict(checkpoint_path=str(ckpts[name]), prompt=PROMPT, max_new_tokens=8, batch_size=2)
            for name in GQA + ["odd_vocab"]}
    return launch(4, jobs, tmp_path_factory.mktemp("four")), reference(jobs)


@pytest.mark.parametrize("name", GQA + ["odd_vocab"])
def test_four_processes_copy_kv_heads(four, name):
    ranks, ref = four
    for got in ranks:
        assert_same(got[name], ref[name])


# ---------------------------------------------------------------------------------------------------- failures

def test_heads_that_do_not_split_give_one_line_error(ckpts, tmp_path):
    (tmp_path / "jobs.json").write_text(json.dumps({"x": dict(checkpoint_path=str(ckpts["llama2"]), prompt=PROMPT)}))
    done = torchrun(3, WORKER, ["--jobs", tmp_path / "jobs.json", "--out", tmp_path / "out"], tmp_path, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot split a model with 4 attention heads, 4 kv heads and 96 feed-forward features "
                      "over 3 processes: use --nproc_per_node 1 or 2 or 4"], done.stderr[-3000:]


def test_a_failing_rank_stops_the_run(ckpts, tmp_path):
    # rank 1 dies before the first collective; rank 0 would wait in it forever if torchrun did not stop it
    (tmp_path / "jobs.json").write_text(json.dumps({"x": dict(checkpoint_path=str(ckpts["llama2"]), prompt=PROMPT)}))
    done = torchrun(2, WORKER, ["--jobs", tmp_path / "jobs.json", "--out", tmp_path / "out", "--fail_rank", "1"],
                    tmp_path, timeout=300)
    assert done.returncode != 0
    assert "[rank1]: RuntimeError: rank 1 failed on purpose" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "out.rank0").exists()


# ---------------------------------------------------------------------------------------------------- 3 processes

def test_real_smollm_on_three_processes(tmp_path):
    ckpt = real_model("SmolLM2-135M-Instruct")  # 9 q heads, 3 kv heads, tied embeddings
    jobs = {"smollm2": dict(checkpoint_path=str(ckpt), prompt=SMOLLM_PROMPT, max_new_tokens=8, batch_size=2)}
    ranks, ref = launch(3, jobs, tmp_path), reference(jobs)
    for got in ranks:
        assert_same(got["smollm2"], ref["smollm2"])


def test_cli_under_torchrun_prints_what_one_process_prints(tmp_path):
    ckpt = real_model("SmolLM2-135M-Instruct")
    args = ["--checkpoint_path", ckpt, "--prompt", "The capital of France is", "--temperature", "0",
            "--max_new_tokens", "16", "--num_samples", "1", "--device", "cpu", "--precision", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "generate.py"] + [str(a) for a in args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    three = torchrun(3, ROOT / "generate.py", args, tmp_path)
    assert three.returncode == 0, three.stderr[-3000:]
    assert three.stdout == one.stdout
    assert len(one.stdout.strip()) > len("The capital of France is")
    assert three.stderr.count("Average tokens/sec") == 1  # progress lines from rank 0 only


# ---------------------------------------------------------------------------------------------------- in process

def test_split_advice_for_the_real_shapes():
    from model import transformer_configs
    from tp import _splits, check_splits
    ok = {name: [n for n in range(1, 17) if _splits(ModelArgs(**transformer_configs[name]), n)]
          for name in ("qwen2.5-0.5b", "smollm2-135m", "llama-3-8b")}
    assert ok == {"qwen2.5-0.5b": [1, 2], "smollm2-135m": [1, 3], "llama-3-8b": [1, 2, 4, 8, 16]}
    with pytest.raises(ValueError, match="over 2 processes: use --nproc_per_node 1 or 3$"):
        check_splits(ModelArgs(**transformer_configs["smollm2-135m"]), 2)


def test_int4_groups_that_straddle_ranks_are_refused():
    import quantize
    from tp import _shard_linear
    lin = quantize.WeightOnlyInt4Linear(64, 32, groupsize=32)  # 2 groups along the input
    _shard_linear(lin, "a", in_spans=[(32, 64)])  # 1 group each on 2 ranks: fine
    assert lin.in_features == lin.padded_in_features == 32 and lin.scales_and_zeros.shape == (1, 32, 2)
    lin = quantize.WeightOnlyInt4Linear(64, 32, groupsize=32)
    with pytest.raises(ValueError, match="cannot split b.scales_and_zeros"):
        _shard_linear(lin, "b", in_spans=[(16, 32)])  # 4 ranks would cut a group in two
    padded = quantize.WeightOnlyInt4Linear(48, 32, groupsize=32, padded_in_features=64)
    with pytest.raises(ValueError, match="padded"):
        _shard_linear(padded, "c", in_spans=[(0, 24)])


def test_int8_head_splits_by_vocabulary():
    import quantize
    from tp import _shard_linear
    g = torch.Generator().manual_seed(0)
    q, scales = quantize.quantize_int8(torch.randn(320, 64, generator=g))
    whole = quantize.WeightOnlyInt8Linear(64, 320)
    whole.load_state_dict({"weight": q, "scales": scales})
    part = quantize.WeightOnlyInt8Linear(64, 320)
    part.load_state_dict({"weight": q, "scales": scales})
    _shard_linear(part, "output", out_spans=[(160, 320)])  # rank 1 of 2
    x = torch.randn(3, 64, generator=g)
    assert part.out_features == 160 and part.scales.shape == (160,)
    torch.testing.assert_close(part(x), whole(x)[:, 160:], rtol=1e-6, atol=1e-6)
