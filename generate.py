# Text generation: compiled prefill and decode over a static KV cache, sampling, speculative decoding, chat.
import argparse
import contextlib
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch._inductor.config

from model import CONFIG_NAME, CheckpointError, Transformer, merge_gate_up, open_checkpoint

# inductor's coordinate-descent tuning stays off: on H100 it bought no decode speed (bf16, int8, qwen2.5-0.5b equal
# within 0.003 ms per step, int4 0.03 ms slower with it), cost compile time (llama-2-7b int4 decode 34 -> 50 s cold)
# and made each compile land 0.04-0.08 ms apart (scripts/bench_notes.md, twenty-second session)
torch._inductor.config.triton.unique_kernel_names = True
torch._inductor.config.fx_graph_cache = True  # later runs reuse compiled kernels
# Programmatic dependent launch (Hopper and later): a kernel starts while the one before it finishes and waits for
# its results only where it reads them (model.py's one-row kernel follows this switch); TORCHINDUCTOR_ENABLE_PDL=0
# turns it off
if hasattr(torch._inductor.config.triton, "enable_pdl") and "TORCHINDUCTOR_ENABLE_PDL" not in os.environ:
    torch._inductor.config.triton.enable_pdl = True


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback."""


def device_sync(device):
    if "cuda" in str(device):
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- sampling

def multinomial_sample_one_no_sync(probs: torch.Tensor) -> torch.Tensor:
    # argmax(p / q) with q ~ Exp(1) draws from p with no host sync (torch.multinomial syncs)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)


def top_k_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None):
    """logits [..., V] -> the distribution sampling draws from, as (probabilities [..., m], their token ids), ids None
    when they cover all V. top_k keeps exactly k tokens (a tie at the k-th value is broken by topk), unsorted, as only
    the set matters; temperature 0 keeps the argmax alone (exact greedy, and exact speculative acceptance)."""
    if temperature == 0:
        ids = torch.argmax(logits, dim=-1, keepdim=True)
        return torch.ones_like(ids, dtype=logits.dtype), ids
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, ids = torch.topk(logits, top_k, sorted=False)
        return torch.nn.functional.softmax(v, dim=-1), ids
    return torch.nn.functional.softmax(logits, dim=-1), None


def draw(p: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """A token [..., 1] from top_k_probs' (p, ids): the draw is over the kept values only."""
    j = multinomial_sample_one_no_sync(p)
    return j if ids is None else torch.gather(ids, -1, j.long()).to(dtype=torch.int)


def dense(p: torch.Tensor, ids: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """top_k_probs' (p, ids) as probabilities over token ids 0 .. width - 1 (ids past them are dropped)."""
    if ids is None:
        return torch.nn.functional.pad(p, (0, max(0, width - p.size(-1))))[..., :width]
    out = torch.zeros(*p.shape[:-1], width + 1, dtype=p.dtype, device=p.device)
    return out.scatter_(-1, ids.clamp(max=width), p)[..., :width]


def prob_at(p: torch.Tensor, ids: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The probabilities of tokens [..., n] under top_k_probs' (p, ids) [..., m]: [..., n], 0 for tokens not kept."""
    if ids is None:
        inside = tokens < p.size(-1)
        return torch.where(inside, p.gather(-1, tokens.clamp(max=p.size(-1) - 1)), 0.0)
    return (p.unsqueeze(-2) * (ids.unsqueeze(-2) == tokens.unsqueeze(-1))).sum(-1)


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """logits [..., V] -> the distribution sampled from over the whole vocabulary [..., V]."""
    return dense(*top_k_probs(logits, temperature, top_k), logits.size(-1))


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """logits [B, V] -> a token [B, 1] drawn from logits_to_probs' distribution without building it: with top_k, a
    softmax and a draw over the k values only. Over a 152k vocabulary the full softmax and draw took ~100 us per
    token on H100, a tenth of a 0.5B model's step."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True).to(dtype=torch.int)
    return draw(*top_k_probs(logits, temperature, top_k))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None):
    """logits [B, S, V] -> next token [B, 1] from the last position and its distribution (p, ids) as top_k_probs gives
    it: a speculative draft hands verify the k kept probabilities, never a vocabulary-wide row (scattering 152k
    values cost ~0.1 ms of a 1 ms draft step on H100)."""
    p, ids = top_k_probs(logits[:, -1], temperature, top_k)
    return draw(p, ids), (p, ids)


# ---------------------------------------------------------------------------------------------------- model steps

def prefill(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, **sampling_kwargs) -> torch.Tensor:
    # x: [B, S], input_pos: [S]
    logits = model(x, input_pos, last_only=True)
    return sample_token(logits[:, -1], **sampling_kwargs)


def decode_one_token(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, with_probs: bool = False,
                     **sampling_kwargs):
    """x [B, 1], input_pos [1] -> (next token [B, 1], its distribution (p, ids) as sample gives it if with_probs
    (speculative drafts need it) else None). x may hold more tokens (a draft's first step of a round reads two): only
    the last one's logits are computed."""
    logits = model(x, input_pos, last_only=True)
    if with_probs:
        return sample(logits, **sampling_kwargs)
    return sample_token(logits[:, -1], **sampling_kwargs), None


class TokenReader:
    """Brings generated tokens to the host one step late, so the GPU is never idle waiting for the host."""

    def __init__(self, device):
        self.cuda = "cuda" in str(device)
        self.pending = []

    def push(self, token: torch.Tensor) -> None:
        if self.cuda:
            host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
            host.copy_(token, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, event))
        else:
            self.pending.append((token, None))

    def pop(self) -> torch.Tensor:
        host, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        return host


def decode_n_tokens(model: Transformer, cur_token: torch.Tensor, input_pos: torch.Tensor, num_new_tokens: int,
                    on_token: Optional[Callable[[list], bool]] = None, **sampling_kwargs) -> list:
    """Decode up to num_new_tokens tokens after cur_token [B, 1]. on_token(ids of one step) returns True to stop;
    it sees each step one step late, so at most one extra token is computed and then dropped."""
    new_tokens, seen = [], 0
    reader = TokenReader(cur_token.device) if on_token else None
    for _ in range(num_new_tokens):
        next_token, _ = decode_one_token(model, cur_token, input_pos, **sampling_kwargs)
        input_pos += 1
        cur_token = next_token.clone()  # the CUDA graph overwrites its output on the next replay
        new_tokens.append(cur_token)
        if reader is not None:
            reader.push(cur_token)
            if len(reader.pending) > 1:
                seen += 1
                if on_token(reader.pop()[:, 0].tolist()):
                    return new_tokens[:seen]
    while reader is not None and reader.pending:
        seen += 1
        if on_token(reader.pop()[:, 0].tolist()):
            return new_tokens[:seen]
    return new_tokens


def model_forward(model, x, input_pos):
    return model(x, input_pos)


def verify(model: Transformer, x: torch.Tensor, input_pos: torch.Tensor, draft_p: torch.Tensor,
           draft_ids: Optional[torch.Tensor], **sampling_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's half of a speculative round, in one function so that --compile makes it one CUDA graph with the
    (k + 1)-token forward. x [1, k + 1]: the last accepted token and k draft tokens; (draft_p, draft_ids) [k, m] the
    draft's distributions as top_k_probs gives them. Rejection sampling: draft token i is kept with probability
    min(1, q_i / p_i); at the first rejection n the token is drawn from the residual max(0, q_n - p_n), and if all k
    are kept from the target's next distribution (a zero draft row k makes that the same formula). With top-k
    sampling every step works on the kept tokens alone, never on a vocabulary-wide row. Returns tokens [k + 1] (the
    first n kept, then the new draw) and n [1]; no host sync."""
    vocab = model.config.vocab_size
    # a draft id the target lacks is never kept (probability 0 there), so the target's outputs after it are unused
    q, q_ids = top_k_probs(model(x.clamp(max=vocab - 1), input_pos)[0], **sampling_kwargs)  # [k + 1, m]
    k = draft_p.size(0)
    draft_tokens = x[0, 1:].long()
    dp = torch.nn.functional.pad(draft_p, (0, 0, 0, 1))  # the zero row k
    dids = None if draft_ids is None else torch.nn.functional.pad(draft_ids, (0, 0, 0, 1))
    tok = torch.cat([draft_tokens, draft_tokens[:1]]).view(-1, 1)  # row k's token is a stand-in, never read
    p, q_tok = prob_at(dp, dids, tok)[:k, 0], prob_at(q, q_ids, tok)[:k, 0]
    accept = torch.rand(k, device=x.device) < torch.clamp(q_tok / p, max=1.0)
    n = torch.where(accept.all(), k, torch.argmin(accept.int())).view(1)  # the first rejection, or k

    def row_n(t):
        return None if t is None else t[n]
    # the residual over the target's kept tokens: where the target keeps none, max(0, q - p) is 0
    p_n = dense(dp[n], row_n(dids), vocab) if q_ids is None else prob_at(dp[n], row_n(dids), q_ids[n])
    residual = torch.clamp(q[n] - p_n, min=0)  # [1, m]
    last = draw(residual / residual.sum(-1, keepdim=True), row_n(q_ids))
    return tok.view(-1).to(torch.int).index_put((n,), last.view(1)), n


def speculative_room(speculate_k: int) -> int:
    """Cache positions speculative decoding needs past the last token kept: a round writes k + 1, and the next round
    is already queued when the host reads that the last one ended the generation."""
    return 2 * (speculate_k + 1)


def speculative_decode(model: Transformer, draft_model: Transformer, last2: torch.Tensor, pos: torch.Tensor,
                       speculate_k: int, **sampling_kwargs):
    """One round, queued with no host sync: the draft proposes k tokens, the target checks k + 1 positions at once
    (verify), and rejection sampling keeps the output distributed exactly as the target's. Batch size 1. last2 [2]:
    the sequence's last two tokens, at positions pos - 1 and pos (pos [1]), on the device. The draft's first step
    reads both: the first rewrites an entry the draft already holds, except after a round that kept all k
    proposals, when it is the draft's last proposal, which it has not read yet; so nothing branches on n. Returns
    the round's tokens [k + 1] (the first n + 1 are kept), n [1], and the next round's last2 and pos."""
    draft_max = draft_model.config.vocab_size - 1
    x, x_pos = last2.view(1, 2), torch.cat([pos - 1, pos])
    draft_tokens, draft_p, draft_ids = [], [], []
    for i in range(speculate_k):
        # the target may emit ids past a narrower draft vocabulary (padding rows); the draft is fed a valid id
        # instead: exactness only needs the draft's proposals and their probabilities, whatever it was fed
        tok, (p, ids) = decode_one_token(draft_model, x.clamp(max=draft_max), x_pos, True, **sampling_kwargs)
        tok = tok.clone()  # copies: the next replay of the CUDA graph overwrites its outputs
        draft_tokens.append(tok.view(1))
        draft_p.append(p.clone())
        draft_ids.append(None if ids is None else ids.clone())
        x, x_pos = tok.view(1, 1), pos + i + 1
    seq = torch.cat([last2[1:]] + draft_tokens)  # the current token and the k proposals
    tokens, n = verify(model, seq.view(1, -1), pos + torch.arange(speculate_k + 1, device=pos.device),
                       torch.cat(draft_p), None if draft_ids[0] is None else torch.cat(draft_ids), **sampling_kwargs)
    # computed before any other compiled call: CUDA graphs share one memory pool, so the draft's next replay may
    # overwrite verify's outputs. The token before the new one is the last proposal kept (or the current token).
    return tokens.clone(), n.clone(), torch.cat([seq[n], tokens[n]]), pos + n + 1


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, batch_size: int = 1,
             draft_model: Optional[Transformer] = None, speculate_k: int = 8, cached_len: int = 0,
             on_token: Optional[Callable[[list], bool]] = None, **sampling_kwargs):
    """Generate after prompt [T]. Returns ([B, T + new] tokens, stats). The KV cache must already hold the first
    cached_len prompt tokens (a chat turn re-uses the history's cache); setup_caches is the caller's job."""
    device = prompt.device
    T = prompt.size(0)
    room = speculative_room(speculate_k) if draft_model else 0
    max_new_tokens = min(max_new_tokens, model.max_seq_length - T - room)
    if max_new_tokens < 1:
        raise UserError(f"the prompt has {T} tokens and leaves no room in the cache of {model.max_seq_length}")
    seq = prompt.view(1, -1).repeat(batch_size, 1)
    input_pos = torch.arange(cached_len, T, device=device)
    next_token = prefill(model, seq[:, cached_len:], input_pos, **sampling_kwargs).clone()
    stats = {"accept_counts": [0] * (speculate_k + 1)} if draft_model else {}
    stopped = on_token is not None and on_token(next_token[:, 0].tolist())
    if draft_model is None:
        new = [] if stopped else decode_n_tokens(model, next_token.view(batch_size, 1),
                                                 torch.tensor([T], device=device, dtype=torch.int64),
                                                 max_new_tokens - 1, on_token, **sampling_kwargs)
        return torch.cat([seq, next_token] + new, dim=1), stats
    # speculative: batch 1; the draft fills its cache with the prompt first
    prefill(draft_model, seq[:, cached_len:].clamp(max=draft_model.config.vocab_size - 1), input_pos,
            **sampling_kwargs)
    last2 = torch.cat([seq[0, -1:], next_token.view(1)])
    pos = torch.tensor([T], device=device, dtype=torch.int64)
    out, reader = next_token.view(1).tolist(), TokenReader(device)
    while not stopped and len(out) < max_new_tokens:
        # queue a round, then read the one before it: the GPU works on a round while the host reads the last
        tokens, n, last2, pos = speculative_decode(model, draft_model, last2, pos, speculate_k, **sampling_kwargs)
        reader.push(torch.cat([n.to(tokens.dtype), tokens]))
        if len(reader.pending) < 2:
            continue
        got = reader.pop().tolist()
        stats["accept_counts"][got[0]] += 1
        accepted = got[1: got[0] + 2][: max_new_tokens - len(out)]
        for j, t in enumerate(accepted):
            if on_token is not None and on_token([t]):
                accepted, stopped = accepted[: j + 1], True
                break
        out += accepted
    return torch.cat([seq, torch.tensor(out, dtype=seq.dtype, device=device).view(1, -1)], dim=1), stats


# ---------------------------------------------------------------------------------------------------- loading

def load_model(checkpoint_path, device, precision: torch.dtype, use_tp: bool = False) -> Transformer:
    """Build on the meta device and map the weights in: no copy until they move to the device."""
    path = Path(checkpoint_path)
    try:
        args, checkpoint = open_checkpoint(path)
    except CheckpointError as e:
        raise UserError(str(e))
    with torch.device("meta"):
        model = Transformer(args)
    quantized = "quantization" in checkpoint  # open_checkpoint returns a dict
    if quantized:
        import quantize
        try:
            quantize.prepare_for_load(model, checkpoint)  # swaps in the quantized modules the checkpoint was made for
        except ValueError as e:
            raise UserError(f"{path}: {e}")
    try:
        model.load_state_dict(checkpoint, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path} does not match {CONFIG_NAME}: {first}")
    if args.tie_word_embeddings and isinstance(model.output, torch.nn.Linear):  # a quantized head has its own weight
        model.output.weight = model.tok_embeddings.weight
    if use_tp:
        import tp
        try:
            tp.apply_tp(model)
        except ValueError as e:
            raise UserError(str(e))
    model = model.to(device=device, dtype=precision)
    if quantized:
        quantize.pack_for_device(model)  # int4 weights take their kernel's layout; int8 on CPU become float16
    elif torch.device(device).type == "cuda":
        merge_gate_up(model)  # decode runs the block in four kernel calls (model.TransformerBlock.few_rows)
    if torch.device(device).type == "cpu":
        lay_out_for_cpu(model)
    return model.eval()


def lay_out_for_cpu(model: Transformer) -> None:
    """A CPU matrix-vector product streams faster through the weight stored input-major ([in, out] in memory) when a
    layer has at least as many outputs as inputs: 1.2-1.7x for SmolLM2's q/k/v, up-projections and head on a 2-core
    machine, slower for the down-projections. The weight keeps its [out, in] shape as a transposed view, so nothing
    else sees a difference; a tied head and embedding stay one tensor. With two or more threads the layers also
    become SplitLinear (same parameters and hooks, another forward)."""
    split = torch.get_num_threads() >= 2
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):  # GemvLinear (model.py) too: its kernel is CUDA-only
            if m.out_features >= m.in_features:
                m.weight.data = m.weight.data.t().contiguous().t()
            if split and m.weight.size(0) % 2 == 0 and m.weight.size(1) % 2 == 0:
                m.__class__ = SplitLinear


class SplitLinear(torch.nn.Linear):
    """MKL computes a matrix-vector product on one core. Written as a batch of two half-size products (baddbmm,
    which MKL runs in parallel and inductor leaves to MKL, where it would turn a bmm of one row into a slow loop of
    its own) it uses two: the outputs split in halves for a weight stored [out, in], the inputs split and the two
    partial sums added for one stored [in, out], both views of the same memory. SmolLM2 on 2 cores, compiled:
    1.1-1.35x the decode speed of F.linear, depending on the cache length (scripts/bench_notes.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        n_out, n_in = w.shape
        x2 = x.reshape(-1, n_in)
        if x2.size(0) > 16:  # a prompt: MKL's matrix product already uses every core
            return super().forward(x)
        zero = x2.new_zeros(())  # baddbmm with beta=0 ignores it
        if w.stride(0) == 1:  # stored [in, out]
            halves = x2.view(-1, 2, n_in // 2).transpose(0, 1)
            y = torch.baddbmm(zero, halves, w.t().view(2, n_in // 2, n_out), beta=0).sum(0)
        else:  # stored [out, in]
            y = torch.baddbmm(zero, x2.expand(2, -1, n_in), w.view(2, n_out // 2, n_in).transpose(1, 2), beta=0)
            y = y.transpose(0, 1).reshape(-1, n_out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], n_out)


def model_size_bytes(model: Transformer) -> int:
    """Bytes a decode step reads: every weight once, the embedding table only one row (counted as nothing)."""
    seen, total = set(), 0
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if "tok_embeddings" in name or "cache" in name or name in ("rope", "causal_mask") or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    if getattr(model.output, "weight", None) is model.tok_embeddings.weight:
        total += model.output.weight.numel() * model.output.weight.element_size()  # read as the head
    return total


# ---------------------------------------------------------------------------------------------------- CLI

def encode_prompt(tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and tokenizer.bos_id() is not None:
        ids = [tokenizer.bos_id()] + ids
    return torch.tensor(ids, dtype=torch.int, device=device)


WARMUP_TOKENS = 16  # tokens of the compiling warm-up sample before the timed ones


class Streamer:
    """Prints text as tokens arrive; stops at the tokenizer's end-of-turn ids."""

    def __init__(self, tokenizer, stop_ids, echo=True):
        self.tokenizer, self.stop_ids, self.echo = tokenizer, set(stop_ids), echo
        self.ids, self.printed = [], ""

    def __call__(self, step_ids: list) -> bool:
        t = step_ids[0]
        if t in self.stop_ids:
            return True
        self.ids.append(t)
        if self.echo:
            text = self.tokenizer.decode(self.ids)
            if not text.endswith("\ufffd"):  # hold back a half-decoded multi-byte character
                print(text[len(self.printed):], end="", flush=True)
                self.printed = text
        return False


def main(args) -> None:
    from tokenizer import get_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.precision or ("bfloat16" if "cuda" in device else "float32")]
    rank = 0
    use_tp = False
    if "LOCAL_RANK" in os.environ:
        import tp
        try:
            rank = tp.maybe_init_dist(device)
        except ValueError as e:
            raise UserError(str(e))
        use_tp = rank is not None
        if use_tp:
            device = f"cuda:{rank}" if "cuda" in device else device
            tp.quiet_other_ranks(rank)  # only rank 0 prints; other ranks still show a crash
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, device, precision, use_tp)
    draft_model = None
    if args.draft_checkpoint_path:
        draft_model = load_model(args.draft_checkpoint_path, device, precision, use_tp)
    device_sync(device)
    print(f"Loaded the model in {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    ckpt_dir = Path(args.checkpoint_path).parent
    try:
        tokenizer = get_tokenizer(args.tokenizer_path or ckpt_dir)
    except ValueError as e:
        raise UserError(str(e))
    if draft_model is not None:
        check_draft_tokenizer(tokenizer, get_tokenizer(Path(args.draft_checkpoint_path).parent))
    stop_ids = set() if args.ignore_eos else tokenizer.stop_ids()

    if args.prompt.isdigit():  # a synthetic prompt of that many tokens
        gen = torch.Generator().manual_seed(1234)
        prompt = torch.randint(0, min(model.config.vocab_size, 1000), (int(args.prompt),), generator=gen)
        prompt = prompt.to(device=device, dtype=torch.int)
    else:
        prompt = encode_prompt(tokenizer, args.prompt, device)
    block = model.config.block_size
    if not args.interactive and prompt.numel() >= block:
        raise UserError(f"the prompt has {prompt.numel()} tokens but the model's context is {block}: shorten it")
    if not args.interactive and prompt.numel() + args.max_new_tokens > block:
        raise UserError(f"the prompt ({prompt.numel()} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds "
                        f"the model's context of {block} tokens: lower --max_new_tokens")
    spec_room = speculative_room(args.speculate_k) if draft_model else 0
    max_seq = min(block, args.max_seq_length) if args.interactive else \
        min(block, prompt.numel() + args.max_new_tokens + spec_room)
    with torch.device(device):
        model.setup_caches(max_batch_size=args.batch_size, max_seq_length=max_seq)
        if draft_model is not None:
            draft_model.setup_caches(max_batch_size=args.batch_size, max_seq_length=max_seq)

    global decode_one_token, prefill, verify
    if args.compile:
        if draft_model is not None:
            verify = torch.compile(verify, mode="reduce-overhead", fullgraph=True)
        # static shapes: a speculative draft's step reads one token, or two at the start of a round
        decode_one_token = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
        if args.compile_prefill:
            prefill = torch.compile(prefill, fullgraph=True, dynamic=True)

    sampling = dict(temperature=args.temperature, top_k=args.top_k or None)
    gen_kwargs = dict(batch_size=args.batch_size, draft_model=draft_model, speculate_k=args.speculate_k, **sampling)
    if args.interactive:
        return chat(model, tokenizer, stop_ids, args, device, gen_kwargs)

    n_bytes = model_size_bytes(model)
    aggregate = {"tokens_per_sec": [], "accept_counts": []}
    start = -1 if args.compile else 0
    for i in range(start, args.num_samples):
        device_sync(device)
        streamer = Streamer(tokenizer, stop_ids, echo=i >= 0 and args.batch_size == 1 and not args.prompt.isdigit())
        if i >= 0 and streamer.echo:
            print(args.prompt, end="", flush=True)
        prof = torch.profiler.profile() if (i == args.num_samples - 1 and args.profile) else contextlib.nullcontext()
        # the warm-up sample (i = -1) compiles and records the CUDA graphs; a few tokens do it (two speculative
        # rounds at k <= 7), so the first text comes sooner (SmolLM2 on 2 CPU cores: 200 tokens took ~10 s)
        n_new = min(args.max_new_tokens, WARMUP_TOKENS) if i == -1 else args.max_new_tokens
        t0 = time.perf_counter()
        with prof:
            y, stats = generate(model, prompt, n_new, on_token=streamer, **gen_kwargs)
        device_sync(device)
        t = time.perf_counter() - t0
        if i == -1:
            print(f"Compilation time: {t:.2f} seconds", file=sys.stderr)
            continue
        if args.profile and i == args.num_samples - 1:
            prof.export_chrome_trace(f"{args.profile}.json")
        if not streamer.echo:
            print(tokenizer.decode(y[0, prompt.numel():].tolist()))
        print()
        n = y.size(1) - prompt.numel()
        tok_s = n * args.batch_size / t
        aggregate["tokens_per_sec"].append(tok_s)
        if stats.get("accept_counts"):
            aggregate["accept_counts"].append(stats["accept_counts"])
        print(f"Time for inference {i + 1}: {t:.02f} sec total, {n} tokens, {tok_s:.02f} tokens/sec", file=sys.stderr)
        print(f"Bandwidth achieved: {n_bytes * tok_s / args.batch_size / 1e9:.02f} GB/s", file=sys.stderr)
    if aggregate["accept_counts"]:
        counts = [sum(c) for c in zip(*aggregate["accept_counts"])]
        total = sum(counts)
        print(f"Acceptance probs: {[round(c / total, 3) for c in counts]}", file=sys.stderr)
        print(f"Mean Accepted: {sum(i * c for i, c in enumerate(counts)) / total:.2f}", file=sys.stderr)
    print("==========", file=sys.stderr)
    print(f"Average tokens/sec: {sum(aggregate['tokens_per_sec']) / len(aggregate['tokens_per_sec']):.2f}",
          file=sys.stderr)
    if "cuda" in device:
        print(f"Memory used: {torch.cuda.max_memory_reserved() / 1e9:.02f} GB", file=sys.stderr)


def check_draft_tokenizer(tokenizer, draft_tokenizer) -> None:
    probe = "Hello, world! 1234 你好 \n\tdef f(x): return x"
    if tokenizer.encode(probe) != draft_tokenizer.encode(probe) or tokenizer.eos_id() != draft_tokenizer.eos_id():
        raise UserError("the draft model's tokenizer differs from the target's: use a draft of the same family")


def chat(model, tokenizer, stop_ids, args, device, gen_kwargs) -> None:
    """Multi-turn chat: the whole history is rendered with the checkpoint's template each turn, and the KV cache
    of the part already seen is kept, so only the new turn is prefilled."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cached = []
    print("Chat with the model; an empty line or Ctrl-D ends it.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        if len(ids) + 1 >= model.max_seq_length:
            print(f"[the conversation has reached the context of {model.max_seq_length} tokens; start a new one]")
            break
        common = 0
        while common < min(len(ids), len(cached)) - 1 and ids[common] == cached[common]:
            common += 1
        streamer = Streamer(tokenizer, stop_ids)
        prompt = torch.tensor(ids, dtype=torch.int, device=device)
        generate(model, prompt, args.max_new_tokens, cached_len=common, on_token=streamer, **gen_kwargs)
        print()
        reply = tokenizer.decode(streamer.ids)
        messages.append({"role": "assistant", "content": reply})
        cached = ids + streamer.ids[:-1]  # the last new token was never fed to the model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a Llama- or Qwen-family model.")
    p.add_argument("--prompt", type=str, default="Hello, my name is",
                   help="input text, or an integer for a synthetic prompt of that many tokens")
    p.add_argument("--interactive", action="store_true", help="chat with the model, keeping the history")
    p.add_argument("--system", type=str, default=None, help="system prompt for --interactive")
    p.add_argument("--num_samples", type=int, default=5, help="number of samples")
    p.add_argument("--max_new_tokens", type=int, default=200, help="largest number of new tokens")
    p.add_argument("--batch_size", type=int, default=1, help="batch size (the prompt is repeated)")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens (0: from all)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 means greedy")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct/model.pth"),
                   help="model.pth written by one of the converters (or quantize.py)")
    p.add_argument("--tokenizer_path", type=Path, default=None, help="tokenizer file or folder (default: beside it)")
    p.add_argument("--compile", action="store_true", help="compile decoding (CUDA graphs on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic prompt length)")
    p.add_argument("--profile", type=Path, default=None, help="write a profiler trace of the last sample here")
    p.add_argument("--speculate_k", type=int, default=5, help="tokens the draft model proposes per round")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None, help="draft model for speculative decoding")
    p.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights and activations dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max_seq_length", type=int, default=8192, help="KV cache length for --interactive")
    p.add_argument("--ignore_eos", action="store_true", help="do not stop at end-of-text (for benchmarks)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k < 0:
        p.error("--top_k must be >= 0 (0 samples from all tokens)")
    if args.draft_checkpoint_path and args.batch_size != 1:
        p.error("speculative decoding supports --batch_size 1 only")
    if args.speculate_k < 1:
        p.error("--speculate_k must be at least 1")
    return args


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
