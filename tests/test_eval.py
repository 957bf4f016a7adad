# eval.py against transformers (perplexity with the same windows) and lm-eval's own `hf` backend (tasks),
# in float32 on CPU; the CLI's one-line errors through subprocess.
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, build_variant

import eval as ev
import generate

SMOL, QWEN = "SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")


def run_eval(*args, env=ENV, timeout=1800):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def assert_one_line_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for w in words:
        assert w in last, last


# ---------------------------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("n,length,stride", [(2, 8, 4), (10, 8, 8), (100, 16, 5), (100, 16, 16), (37, 37, 1),
                                              (38, 37, 20)])
def test_windows_score_each_token_at_most_once_with_context(n, length, stride):
    scored = []
    for begin, end, first in ev.windows(n, length, stride):
        assert end - begin <= length and begin < first <= end
        scored += range(first, end)
    assert scored == sorted(set(scored)) and scored[-1] == n - 1
    if stride < length:  # overlapping windows score every token but the prefix
        assert scored == list(range(1, n))


# ---------------------------------------------------------------------------------------------------- random variants

def hf_strided_nll(hf, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The strided scheme of the transformers perplexity guide: labels -100 on the tokens an earlier window scored."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        x = ids[begin:end].long()[None]
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(x, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count, prev_end = total + loss.item() * n, count + n, end
        if end == ids.numel():
            break
    return total, count


def test_perplexity_matches_transformers_on_random_variants(variant):
    name, hf, ckpt_dir = variant
    model = generate.load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1))
    for length, stride in [(64, 24), (64, 64), (200, 100)]:
        ours = ev.perplexity_nll(model, ids, length, stride)
        ref = hf_strided_nll(hf, ids, length, stride)
        assert ours[1] == ref[1] == (149 if stride < length else 149 - (150 - 1) // length)
        assert ours[0] == pytest.approx(ref[0], rel=1e-5), (name, length, stride)


def hf_request_logprob(hf, ctx, cont, max_length):
    full = (ctx + cont)[-(max_length + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([full[:-1]])).logits[0].float()
    logprobs = F.log_softmax(logits[-len(cont):], dim=-1)
    target = torch.tensor(cont)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def random_requests(vocab, n, seed):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        c, k = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(0, vocab, (c + k,), generator=g).tolist()
        reqs.append((None, ids[:c], ids[c:]))
    reqs.append((None, list(range(90)), [5, 6, 7]))  # longer than the window: cut from the left
    return reqs


def test_loglikelihood_tokens_match_transformers_in_padded_batches(variant):
    pytest.importorskip("lm_eval")
    name, hf, ckpt_dir = variant
    model = generate.load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    reqs = random_requests(hf.config.vocab_size, 9, seed=2)
    for batch_size in (1, 4):
        lm = ev.GPTFastLM(model, tokenizer=None, max_seq_length=64, batch_size=batch_size)
        got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
        for (_, ctx, cont), (logprob, greedy) in zip(reqs, got):
            ref_logprob, ref_greedy = hf_request_logprob(hf, ctx, cont, 64)
            assert logprob == pytest.approx(ref_logprob, rel=1e-5, abs=1e-4), (name, batch_size)
            assert greedy == ref_greedy


def test_compiled_forward_gives_the_same_loglikelihoods(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    hf, ckpt_dir = build_variant("qwen2", tmp_path)  # compiling one variant is enough
    # GPTFastLM(compile=True) compiles generate's steps in place, as generate.py's CLI does; undo that afterwards
    monkeypatch.setattr(generate, "decode_one_token", generate.decode_one_token)
    monkeypatch.setattr(generate, "prefill", generate.prefill)
    model = generate.load_model(ckpt_dir / "model.pth", "cpu", torch.float32)
    reqs = random_requests(hf.config.vocab_size, 6, seed=3)
    eager = ev.GPTFastLM(model, None, 64, batch_size=2)._loglikelihood_tokens(reqs, disable_tqdm=True)
    compiled = ev.GPTFastLM(model, None, 64, batch_size=2, compile=True)._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(eager, compiled):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-4) and ga == gb


# ---------------------------------------------------------------------------------------------------- text files

def test_read_documents_formats(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("First paragraph\nstill first.\n\n\nSecond one.\n")
    assert ev.read_documents(plain) == ["First paragraph\nstill first.", "Second one."]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n")
    assert ev.read_documents(jsonl) == ["one", "two"]
    summaries = tmp_path / "c.json"
    summaries.write_text(json.dumps({"X": {"title": "X", "extract": "X is a letter."},
                                     "Y": {"title": "Y", "extract": "Y too."}}))
    assert ev.read_documents(summaries) == ["X is a letter.", "Y too."]
    braces = tmp_path / "d.txt"
    braces.write_text("{not json} but text")
    assert ev.read_documents(braces) == ["{not json} but text"]


def test_default_text_is_the_half_gptq_does_not_calibrate_on():
    from quantize import wiki_texts
    docs = ev.default_documents()
    assert len(docs) > 4000 and not set(docs) & set(wiki_texts("calibration"))


# ---------------------------------------------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def hf_models():
    """name -> (transformers model, tokenizer), loaded from the same GGUF our checkpoints were converted from."""
    from scripts.offline_models import gguf_path, prepare
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(name):
        if name not in cache:
            prepare(name)
            g = gguf_path(name)
            tok = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
            hf = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name,
                                                                   dtype=torch.float32).eval()
            cache[name] = hf, tok
        return cache[name]
    return get


def checkpoint(name):
    return ROOT / "checkpoints" / name / "model.pth"


@pytest.fixture(scope="module")
def smol():
    from scripts.offline_models import prepare
    return prepare(SMOL) / "model.pth"


@pytest.mark.parametrize("name,n_docs,length", [(SMOL, 7, 256), (QWEN, 5, 128)])
def test_perplexity_matches_transformers_on_real_models(name, n_docs, length, hf_models, tmp_path):
    hf, tok = hf_models(name)
    docs = ev.default_documents()[:n_docs]
    text_file = tmp_path / "docs.jsonl"
    text_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stride = length // 2
    r = run_eval("--checkpoint_path", checkpoint(name), "--ppl_file", text_file, "--max_seq_length", length,
                 "--stride", stride, "--precision", "float32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    token_ppl = float(re.search(r"token perplexity: ([\d.]+)", r.stdout).group(1))
    word_ppl = float(re.search(r"word perplexity: ([\d.]+)", r.stdout).group(1))

    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.tensor([prefix] + tok("\n\n".join(docs), add_special_tokens=False).input_ids)
    assert ids.numel() > length + 2 * stride  # four windows or more
    nll, n = hf_strided_nll(hf, ids, length, stride)
    words = sum(len(d.split()) for d in docs)
    assert token_ppl == pytest.approx(math.exp(nll / n), rel=1e-3)
    assert word_ppl == pytest.approx(math.exp(nll / words), rel=1e-3)
    print(f"{name}: token perplexity {token_ppl:.4f} (transformers {math.exp(nll / n):.4f}), "
          f"word perplexity {word_ppl:.4f} (transformers {math.exp(nll / words):.4f})")


@pytest.fixture(scope="module")
def smol_lms(hf_models):
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from lm_eval.models.huggingface import HFLM
    from tokenizer import get_tokenizer
    hf, tok = hf_models(SMOL)
    ours = generate.load_model(checkpoint(SMOL), "cpu", torch.float32)
    mine = ev.GPTFastLM(ours, get_tokenizer(checkpoint(SMOL).parent), max_seq_length=128, batch_size=3)
    ref = HFLM(pretrained=hf, tokenizer=tok, max_length=128, batch_size=8, device="cpu")
    return mine, ref


def instances(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_adapter_requests_match_lm_eval_hf_backend(smol_lms):
    mine, ref = smol_lms
    docs = ev.default_documents()[:4]
    pairs = [(d[:60], d[60:100]) for d in docs] + [(docs[0][:40] + " ", "and"), ("", docs[1][:30]),
                                                  (" ".join(docs[:3]), " end.")]  # the last one is cut to fit
    got = mine.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    want = ref.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-3) and ga == gb

    texts = [(d,) for d in docs[:3]]
    got = mine.loglikelihood_rolling(instances("loglikelihood_rolling", texts), disable_tqdm=True)
    want = ref.loglikelihood_rolling(instances("loglikelihood_rolling", texts), disable_tqdm=True)
    assert got == pytest.approx(want, rel=1e-4)

    gen_kwargs = {"until": [".", "\n\n"], "max_gen_toks": 24, "do_sample": False}
    prompts = [(d[:50], dict(gen_kwargs)) for d in docs[:3]]
    got = mine.generate_until(instances("generate_until", prompts), disable_tqdm=True)
    want = ref.generate_until(instances("generate_until", prompts), disable_tqdm=True)
    assert got == want
    assert all(g and "." not in g for g in got)


def test_local_tasks_match_lm_eval_hf_backend(smol_lms, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    mine_lm, ref = smol_lms
    tm = TaskManager(include_path=str(ROOT / "tasks"), include_defaults=False)
    out = tmp_path / "results.json"
    r = run_eval("--checkpoint_path", checkpoint(SMOL), "--tasks", "wiki_cloze", "--limit", 40, "--max_seq_length",
                 128, "--batch_size", 8, "--precision", "float32", "--device", "cpu", "--output_file", out)
    assert r.returncode == 0, r.stderr
    assert "wiki_cloze" in r.stdout and "acc_norm" in r.stdout  # the results table
    mine = json.loads(out.read_text())
    mine.update(ev.evaluate_tasks(mine_lm, tm, ["wiki_ppl"], limit=6)["results"])
    want = lm_eval.simple_evaluate(model=ref, tasks=["wiki_cloze"], task_manager=tm, limit=40, bootstrap_iters=0,
                                   log_samples=False)["results"]
    want.update(lm_eval.simple_evaluate(model=ref, tasks=["wiki_ppl"], task_manager=tm, limit=6, bootstrap_iters=0,
                                        log_samples=False)["results"])
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(mine["wiki_cloze"][metric] - want["wiki_cloze"][metric]) <= 0.005, metric
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert mine["wiki_ppl"][metric] == pytest.approx(want["wiki_ppl"][metric], rel=1e-4), metric
    print(f"wiki_cloze acc {mine['wiki_cloze']['acc,none']:.4f} (hf {want['wiki_cloze']['acc,none']:.4f}), "
          f"acc_norm {mine['wiki_cloze']['acc_norm,none']:.4f} (hf {want['wiki_cloze']['acc_norm,none']:.4f}); "
          f"wiki_ppl word perplexity {mine['wiki_ppl']['word_perplexity,none']:.4f} "
          f"(hf {want['wiki_ppl']['word_perplexity,none']:.4f})")


def test_a_user_json_task_runs_offline(smol, tmp_path):
    """A task of one's own: lm-eval YAML with dataset_path json and a local data file."""
    pytest.importorskip("lm_eval")
    data = tmp_path / "capitals.jsonl"
    rows = [("The capital of France is", ["Paris", "Rome"], 0), ("The capital of Italy is", ["Paris", "Rome"], 1)]
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": lab}) + "\n" for q, c, lab in rows))
    yaml = tmp_path / "capitals.yaml"
    yaml.write_text(f"task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\n"
                    "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "r.json"
    r = run_eval("--checkpoint_path", smol, "--tasks", yaml, "--output_file", out)
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(out.read_text())["capitals"]["acc,none"] <= 1


# ---------------------------------------------------------------------------------------------------- CLI errors

def test_missing_checkpoint(tmp_path):
    assert_one_line_error(run_eval("--checkpoint_path", tmp_path / "nope" / "model.pth", "--limit", 1),
                          "not found")


def test_unreadable_text_files(tmp_path):
    binary = tmp_path / "x.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    for path, words in [(tmp_path, "cannot read"), (binary, "cannot read"), (empty, "no text")]:
        with pytest.raises(generate.UserError, match=words):
            ev.read_documents(path)
    assert_one_line_error(run_eval("--checkpoint_path", checkpoint(SMOL), "--ppl_file", tmp_path / "missing.txt"),
                          "cannot read", "missing.txt")


def test_stride_longer_than_window(smol):
    assert_one_line_error(run_eval("--checkpoint_path", smol, "--limit", 1, "--max_seq_length", 64,
                                   "--stride", 65), "--stride")


def test_missing_lm_eval():
    # the interpreter behaves as if lm_eval were not installed
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['eval.py'] + sys.argv[1:]; "
            "runpy.run_path('eval.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--checkpoint_path", str(checkpoint(SMOL)), "--tasks",
                        "wiki_cloze"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert_one_line_error(r, "pip install lm_eval")


def test_unknown_task_name():
    pytest.importorskip("lm_eval")
    assert_one_line_error(run_eval("--checkpoint_path", checkpoint(SMOL), "--tasks", "wiki_cloze",
                                   "no_such_task_xyz"), "no_such_task_xyz", "wiki_cloze")


def test_stock_task_without_a_hub():
    pytest.importorskip("lm_eval")
    assert_one_line_error(run_eval("--checkpoint_path", checkpoint(SMOL), "--tasks", "arc_easy"), "Hub")


def test_quantized_checkpoint_evaluates_like_any_other(smol, tmp_path):
    import shutil
    from quantize import quantize_checkpoint
    for f in smol.parent.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, tmp_path / f.name)  # model config and tokenizer files
    int8 = quantize_checkpoint(smol, "int8", output_path=tmp_path / "model_int8.pth", log=lambda *a: None)
    ppl = {}
    for path in (smol, int8):
        r = run_eval("--checkpoint_path", path, "--limit", 2, "--max_seq_length", 64)
        assert r.returncode == 0, r.stderr
        ppl[path] = float(re.search(r"token perplexity: ([\d.]+)", r.stdout).group(1))
    assert ppl[int8] == pytest.approx(ppl[smol], rel=0.05) and ppl[int8] != ppl[smol]
