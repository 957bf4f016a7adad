# generate.py: compiled decoding, speculative decoding (exact greedy, exact distribution), chat, the CLI's errors.
import subprocess
import sys

import pytest
import torch

import generate as G
import quantize
from conftest import ROOT, build_variant
from model import ModelArgs, Transformer


def run_cli(*args, stdin=None, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_variant("qwen2", tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def smollm():
    from scripts.offline_models import prepare
    return prepare("SmolLM2-135M-Instruct")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test leaves dynamo's caches empty: compiled tests here compile generate.py's functions for many models,
    the entries pile up on the same code objects, and past 8 a later fullgraph compile (tests/test_tp.py's
    reference run, in the same pytest process) fails with dynamo's recompile limit."""
    yield
    torch._dynamo.reset()


def greedy(model, prompt, n, **kw):
    model.setup_caches(1, prompt.numel() + n + 16)
    return G.generate(model, prompt, n, temperature=0, **kw)


def test_top_k_keeps_exactly_the_k_largest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g)
    logits[1, :7] = 9.0  # a tie at the top: k of the seven are kept when k < 7
    for k in (1, 7, 200, 500, 900):
        kk = min(k, 500)
        kth = logits.sort(dim=-1, descending=True).values[:, kk - 1:kk]
        for f in (G.logits_to_probs, torch.compile(G.logits_to_probs, fullgraph=True)):
            got = f(logits, 0.7, k)
            kept = got > 0
            assert (kept.sum(-1) == kk).all()  # exactly k
            assert (logits[kept] >= kth.expand_as(logits)[kept]).all() and kept[logits > kth].all()
            want = torch.softmax(torch.where(kept, logits / 0.7, -float("inf")), dim=-1)
            assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 5])
def test_sample_token_draws_from_logits_to_probs(top_k):
    # sample_token never builds the distribution; its draws follow logits_to_probs' (the one speculative decoding
    # checks against) within 5 standard deviations per token, and never leave the top k
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    probs = G.logits_to_probs(logits, 0.7, top_k)[0]
    n = 40000
    for f in (G.sample_token, torch.compile(G.sample_token, fullgraph=True)):
        draws = f(logits.expand(n, 12), 0.7, top_k)
        assert draws.shape == (n, 1) and draws.dtype == torch.int
        freq = torch.bincount(draws[:, 0].long(), minlength=12).double() / n
        assert ((freq - probs.double()).abs() <= 5 * (probs.double() * (1 - probs.double()) / n).sqrt() + 1e-9).all()
    assert torch.equal(G.sample_token(logits, 0, top_k), logits.argmax(-1, keepdim=True).int())


@pytest.mark.parametrize("top_k", [None, 5])
def test_draft_sample_draws_from_the_distribution_it_returns(top_k):
    # sample (a speculative draft's step) returns logits_to_probs' distribution (as the kept values and their ids)
    # and draws its token from it
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 12) * 2
    want = G.logits_to_probs(logits[:, -1], 0.7, top_k)[0].double()
    n = 40000
    for f in (G.sample, torch.compile(G.sample, fullgraph=True)):
        draws, (p, ids) = f(logits.expand(n, 1, 12), 0.7, top_k)
        assert p.size(-1) == (top_k or 12) and (ids is None) == (top_k is None)
        assert draws.shape == (n, 1) and draws.dtype == torch.int
        assert torch.allclose(G.dense(p[:1], None if ids is None else ids[:1], 12)[0].double(), want)
        freq = torch.bincount(draws[:, 0].long(), minlength=12).double() / n
        assert ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 1e-9).all()


def test_compiled_decode_matches_eager(qwen2, monkeypatch):
    _, ckpt = qwen2
    model = G.load_model(ckpt / "model.pth", "cpu", torch.float32)
    prompt = torch.tensor([5, 9, 33, 2, 71], dtype=torch.int)
    eager, _ = greedy(model, prompt, 16)
    monkeypatch.setattr(G, "decode_one_token", torch.compile(G.decode_one_token, fullgraph=True))
    monkeypatch.setattr(G, "prefill", torch.compile(G.prefill, fullgraph=True, dynamic=True))
    model2 = G.load_model(ckpt / "model.pth", "cpu", torch.float32)
    compiled, _ = greedy(model2, prompt, 16)
    assert compiled.tolist() == eager.tolist()


def test_compiled_decode_follows_a_change_of_batch_size(qwen2, monkeypatch):
    # One compiled decode, batch 1 then 2 in the same process: dynamo recompiles with the batch dimension dynamic.
    # (torch.compiler.nested_compile_region on the layers failed exactly here on torch 2.13.)
    _, ckpt = qwen2
    model = G.load_model(ckpt / "model.pth", "cpu", torch.float32)
    prompt = torch.tensor([5, 9, 33, 2, 71], dtype=torch.int)
    eager, _ = greedy(model, prompt, 8)
    model.setup_caches(2, prompt.numel() + 24)
    monkeypatch.setattr(G, "decode_one_token", torch.compile(G.decode_one_token, fullgraph=True))
    for batch_size in (1, 2):
        y, _ = G.generate(model, prompt, 8, batch_size=batch_size, temperature=0)
        assert y.tolist() == eager.tolist() * batch_size


@pytest.mark.parametrize("compiled", [False, True])
def test_speculative_greedy_is_exact(qwen2, tmp_path, monkeypatch, compiled):
    _, ckpt = qwen2
    target = G.load_model(ckpt / "model.pth", "cpu", torch.float32)
    prompt = torch.tensor([5, 9, 33, 2, 71], dtype=torch.int)
    plain, _ = greedy(target, prompt, 30)
    if compiled:  # as generate.py --compile runs it: draft steps and the verify (forward + acceptance) compiled
        monkeypatch.setattr(G, "decode_one_token", torch.compile(G.decode_one_token, fullgraph=True))
        monkeypatch.setattr(G, "verify", torch.compile(G.verify, fullgraph=True))
    # a different random model as draft: most proposals are rejected, which exercises the residual path
    _, other = build_variant("qwen2_tied", tmp_path)
    # and the target with its head in int8 (quantize.py --mode int8-head): the cheap draft of the same model
    head8 = quantize.quantize_checkpoint(ckpt / "model.pth", "int8-head", log=lambda *a: None)  # beside model.pth
    for draft_path, k in ((other / "model.pth", 4), (ckpt / "model.pth", 3), (head8, 4)):
        draft = G.load_model(draft_path, "cpu", torch.float32)
        assert isinstance(draft.output, quantize.WeightOnlyInt8Linear) == (draft_path == head8)
        draft.setup_caches(1, prompt.numel() + 30 + 16)
        spec, stats = greedy(target, prompt, 30, draft_model=draft, speculate_k=k)
        assert spec.tolist() == plain.tolist()
        if draft_path == ckpt / "model.pth":  # drafting for itself: every proposal is accepted
            assert sum(stats["accept_counts"][:-1]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_compiled_speculative_keeping_every_draft_token(qwen2, monkeypatch):
    # CUDA graphs for the draft steps and the verify, as generate.py --compile runs them. The draft is the target, so
    # every round keeps all k tokens and takes the draft's catch-up step, whose replay shares the graphs' memory pool
    # with verify's outputs
    _, ckpt = qwen2
    target, draft = (G.load_model(ckpt / "model.pth", "cuda", torch.float32) for _ in range(2))
    prompt = torch.tensor([5, 9, 33, 2, 71], dtype=torch.int, device="cuda")
    plain, _ = greedy(target, prompt, 30)
    for name in ("decode_one_token", "verify"):
        monkeypatch.setattr(G, name, torch.compile(getattr(G, name), mode="reduce-overhead", fullgraph=True))
    draft.setup_caches(1, prompt.numel() + 30 + 16)
    spec, stats = greedy(target, prompt, 30, draft_model=draft, speculate_k=4)
    assert spec.tolist() == plain.tolist() and sum(stats["accept_counts"][:-1]) == 0


@pytest.fixture
def one_thread():
    """Thousands of tiny forwards: one thread avoids waiting on a busy second core at every matmul."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_pair(draft_vocab=None):
    torch.manual_seed(0)
    args = dict(vocab_size=6, n_layer=1, n_head=2, dim=16, intermediate_size=32, block_size=64)
    target, draft = Transformer(ModelArgs(**args)), Transformer(ModelArgs(**dict(args, vocab_size=draft_vocab or 6)))
    for m, scale in ((target, 1.0), (draft, 0.7)):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, scale)
        m.setup_caches(1, 32)
    return target.eval(), draft.eval()


def exact_pair_distribution(model, prompt, top_k=None):
    """P(t1, t2 | prompt) of the target, sampled at temperature 1 with top_k, computed exactly."""
    v = model.config.vocab_size
    with torch.no_grad():
        seqs = torch.cat([prompt.repeat(v, 1), torch.arange(v).view(v, 1)], dim=1)
        model.setup_caches(v, 32)
        logits = model(seqs, torch.arange(seqs.size(1)))
    p1 = G.logits_to_probs(logits[0, -2].double(), 1.0, top_k)
    p2 = G.logits_to_probs(logits[:, -1].double(), 1.0, top_k)
    model.setup_caches(1, 32)
    return (p1[:, None] * p2).flatten()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    keep = expected > 5  # pool rare cells so the chi-square approximation holds
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    stat = ((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum()
    df = torch.tensor(float(obs.numel() - 1), dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


def speculative_pair_counts(target, draft, prompt, n_samples, k=2, top_k=None):
    v = target.config.vocab_size
    counts = torch.zeros(v * v, dtype=torch.float64)
    torch.manual_seed(123)
    for _ in range(n_samples):
        y, _ = G.generate(target, prompt, 3, draft_model=draft, speculate_k=k, temperature=1.0, top_k=top_k)
        t1, t2 = y[0, prompt.numel()].item(), y[0, prompt.numel() + 1].item()
        counts[t1 * v + t2] += 1
    return counts


# top_k None: both distributions over the whole vocabulary (6 ids for the target); 3: both the kept values alone;
# 5 and 6: one of each (the target keeps 5 of its 6 ids while a 5-id draft keeps all; a 7-id draft keeps 6 of 7)
@pytest.mark.parametrize("draft_vocab,compiled,top_k", [(6, False, None), (5, False, None), (5, True, None),
                                                        (7, True, None), (6, False, 3), (7, True, 3), (5, False, 5),
                                                        (7, False, 6)])
def test_speculative_sampling_follows_target_distribution(draft_vocab, compiled, top_k, one_thread, monkeypatch):
    if compiled:  # the acceptance arithmetic compiled, its random draws made by inductor
        monkeypatch.setattr(G, "verify", torch.compile(G.verify, fullgraph=True))
    target, draft = tiny_pair(draft_vocab)
    prompt = torch.tensor([1, 4, 2], dtype=torch.int)
    probs = exact_pair_distribution(target, prompt, top_k)
    counts = speculative_pair_counts(target, draft, prompt, 2000, top_k=top_k)
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_wrong_acceptance_rule_is_caught(monkeypatch, one_thread):
    """The same check must reject speculation that always accepts the draft (uniform draws of 0)."""
    target, draft = tiny_pair()
    prompt = torch.tensor([1, 4, 2], dtype=torch.int)
    probs = exact_pair_distribution(target, prompt)
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.zeros_like(real_rand(*a, **kw)))
    counts = speculative_pair_counts(target, draft, prompt, 2000)
    assert chi_square_pvalue(counts, probs) < 1e-6


def test_cli_greedy_text_matches_library(smollm):
    model = G.load_model(smollm / "model.pth", "cpu", torch.float32)
    from tokenizer import get_tokenizer
    tok = get_tokenizer(smollm)
    prompt = G.encode_prompt(tok, "The capital of France is", "cpu")
    y, _ = greedy(model, prompt, 24)
    new = y[0, prompt.numel():].tolist()
    stop = [i for i, t in enumerate(new) if t in tok.stop_ids()]
    expected = tok.decode(new[: stop[0]] if stop else new)
    out = run_cli("--checkpoint_path", smollm / "model.pth", "--prompt", "The capital of France is",
                  "--temperature", "0", "--max_new_tokens", "24", "--num_samples", "1")
    assert out.returncode == 0, out.stderr
    assert "The capital of France is" + expected in out.stdout
    assert "tokens/sec" in out.stderr


def test_chat_reuses_history_cache_exactly(smollm):
    """Turn two, prefilled from the cached history, equals generating it from scratch."""
    turns = ["Name a colour.", "And another one?"]
    out = run_cli("--checkpoint_path", smollm / "model.pth", "--interactive", "--temperature", "0",
                  "--max_new_tokens", "40", "--system", "You are terse.", stdin="\n".join(turns) + "\n")
    assert out.returncode == 0, out.stderr
    from tokenizer import get_tokenizer
    tok = get_tokenizer(smollm)
    model = G.load_model(smollm / "model.pth", "cpu", torch.float32)
    messages = [{"role": "system", "content": "You are terse."}]
    replies = []
    for user in turns:
        messages.append({"role": "user", "content": user})
        prompt = torch.tensor(tok.encode_chat(messages), dtype=torch.int)
        streamer = G.Streamer(tok, tok.stop_ids(), echo=False)
        model.setup_caches(1, 8192)
        G.generate(model, prompt, 40, temperature=0, on_token=streamer)
        replies.append(tok.decode(streamer.ids))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert all(r.strip() for r in replies)
    for r in replies:
        assert r in out.stdout


def bad(out, *words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(w in last for w in words), last


def test_cli_errors(smollm, tmp_path):
    bad(run_cli("--checkpoint_path", tmp_path / "nope" / "model.pth"), "not found")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pth").write_bytes(b"\x00not a checkpoint" * 100)
    (corrupt / "model_config.json").write_bytes((smollm / "model_config.json").read_bytes())
    bad(run_cli("--checkpoint_path", corrupt / "model.pth"), "corrupt")
    no_cfg = tmp_path / "nocfg"
    no_cfg.mkdir()
    (no_cfg / "model.pth").symlink_to(smollm / "model.pth")
    bad(run_cli("--checkpoint_path", no_cfg / "model.pth"), "model_config.json")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model.pth").symlink_to(smollm / "model.pth")
    (unknown / "model_config.json").write_text('{"n_layer": 2, "sliding_window": 4096}')
    bad(run_cli("--checkpoint_path", unknown / "model.pth"), "sliding_window")
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    (no_tok / "model.pth").symlink_to(smollm / "model.pth")
    (no_tok / "model_config.json").write_bytes((smollm / "model_config.json").read_bytes())
    bad(run_cli("--checkpoint_path", no_tok / "model.pth"), "tokenizer")
    ckpt = smollm / "model.pth"
    bad(run_cli("--checkpoint_path", ckpt, "--prompt", "hi " * 9000), "context")
    bad(run_cli("--checkpoint_path", ckpt, "--max_new_tokens", "9000"), "--max_new_tokens")
    assert run_cli("--checkpoint_path", ckpt, "--temperature", "-1").returncode == 2
    r = run_cli("--checkpoint_path", ckpt, "--top_k", "-3")
    assert r.returncode == 2 and "--top_k must be >= 0" in r.stderr and "Traceback" not in r.stderr
