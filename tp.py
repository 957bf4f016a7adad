# Tensor parallelism: shard a loaded Transformer across the processes of one torchrun launch, from outside model.py.
# q/k/v, w1 and w3 are split by output features (column-parallel); wo and w2 by input features (row-parallel), and a
# forward hook all-reduces their partial sums. The output head is split by vocabulary and a hook gathers the logits.
#
#   torchrun --standalone --nproc_per_node=2 generate.py --compile --checkpoint_path checkpoints/.../model.pth
import atexit
import io
import os
import sys
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # traceable by torch.compile, capturable in CUDA graphs
from torch import nn

from model import Attention, FeedForward, ModelArgs, Transformer

# A rank stuck this long in a collective fails instead of waiting forever. A rank that exits makes torchrun stop
# the others at once; this only bounds a rank that hangs without exiting.
TIMEOUT = timedelta(minutes=10)


def _shutdown() -> None:
    if not dist.is_initialized():
        return
    # CUDA graphs holding captured NCCL calls can make destroy_process_group hang (pytorch/pytorch#115388):
    # free torch.compile's graphs first
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees
    reset_cudagraph_trees()
    dist.destroy_process_group()


def maybe_init_dist(device: Optional[str] = None) -> Optional[int]:
    """Join the process group when torchrun started more than one process: returns this rank, else None.
    NCCL when the run is on CUDA (device, or CUDA being available when device is None), gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" not in os.environ or world_size < 2:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
        raise ValueError("tensor parallelism runs on one host: launch with torchrun --standalone --nproc_per_node=N")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast is left off on these machines
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    on_cuda = "cuda" in device if device else torch.cuda.is_available()
    atexit.register(_shutdown)
    if not on_cuda:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
        return rank
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"{world_size} processes but {torch.cuda.device_count()} GPUs: "
                         "use --nproc_per_node at most the number of GPUs")
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=TIMEOUT,
                            device_id=torch.device("cuda", local_rank))
    return rank


class _ErrorLinesOnly(io.TextIOWrapper):
    """stderr of a rank other than 0: drops progress lines, keeps `error: ...` lines but holds them back a moment.
    Rank 0 meets the same input error and prints it; torchrun then stops this rank before a copy appears. Should rank 0
    lag, the message still comes, from here. A real file underneath (os.devnull), for code that asks for fileno()."""
    GRACE_S = 3.0

    def __init__(self, rank: int):
        super().__init__(open(os.devnull, "wb"), line_buffering=True)
        self.rank, self.pending = rank, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith("error:"):
                time.sleep(self.GRACE_S)
                sys.__stderr__.write(f"[rank{self.rank}]: {line}\n")
                sys.__stderr__.flush()
        return len(text)


def quiet_other_ranks(rank: int) -> None:
    """Only rank 0 prints. Input errors are the same on every rank, so rank 0 reports them; a crash may be one rank's
    own, so every rank shows its traceback at once (init_process_group's hook prefixes it with [rankN]:)."""
    if rank == 0:
        return
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _ErrorLinesOnly(rank)
    previous = sys.excepthook

    def excepthook(*exc_info):
        sys.stderr = sys.__stderr__
        previous(*exc_info)

    sys.excepthook = excepthook


# ---------------------------------------------------------------------------------------------------- what can split

def _kv_heads_of_rank(n_head: int, n_kv: int, rank: int, world_size: int) -> tuple:
    """The kv heads (first, count) that this rank's q heads read. With fewer kv heads than ranks, the ranks that share
    a kv head each hold a copy of it."""
    if n_kv % world_size == 0:
        per_rank = n_kv // world_size
        return rank * per_rank, per_rank
    return rank // (world_size // n_kv), 1


def _splits(config: ModelArgs, world_size: int) -> bool:
    n_head, n_kv = config.n_head, config.n_local_heads
    heads_ok = n_head % world_size == 0 and (n_kv % world_size == 0 or world_size % n_kv == 0)
    return heads_ok and config.intermediate_size % world_size == 0


def check_splits(config: ModelArgs, world_size: int) -> None:
    if _splits(config, world_size):
        return
    ok = [str(n) for n in range(1, config.n_head + 1) if _splits(config, n)]
    raise ValueError(f"cannot split a model with {config.n_head} attention heads, {config.n_local_heads} kv heads and "
                     f"{config.intermediate_size} feed-forward features over {world_size} processes: "
                     f"use --nproc_per_node {' or '.join(ok)}")


# ---------------------------------------------------------------------------------------------------- slicing

# For each tensor a linear layer may hold, the axes that run along its output and its input features (None: not
# along that one). A packed axis (two int4 codes per byte, one scale per group of columns) is sliced in proportion.
# int4 is split in quantize.py's device-neutral form, before pack_for_device turns it into a kernel's layout.
AXES = {
    "weight": (0, 1),  # float [out, in]; int8 [out, in]; int4 uint8 [out, in / 2]
    "bias": (0, None),
    "scales": (0, None),  # int8: one per output channel
    "scales_and_zeros": (1, 0),  # int4: [in / groupsize, out, 2]
}


def _take(t: torch.Tensor, axis: int, n_features: int, spans: list) -> torch.Tensor:
    """The parts of t along axis for feature ranges spans [(start, stop)] out of n_features, in that order."""
    size = t.size(axis)
    parts = []
    for start, stop in spans:
        if (start * size) % n_features or (stop * size) % n_features:
            raise ValueError(f"its {size} entries along axis {axis} cannot be cut at features {start}:{stop} of "
                             f"{n_features}: quantization groups would straddle two processes; use fewer processes "
                             "or quantize with a smaller --groupsize")
        parts.append(t.narrow(axis, start * size // n_features, (stop - start) * size // n_features))
    return torch.cat(parts, axis) if len(parts) > 1 else parts[0].contiguous()


def _shard_linear(linear: nn.Module, name: str, out_spans: Optional[list] = None, in_spans: Optional[list] = None):
    """Keep only the output features in out_spans, or the input features in in_spans, of every tensor of linear."""
    tensors = dict(linear.named_parameters(recurse=False))
    tensors.update(linear.named_buffers(recurse=False))
    n_in = getattr(linear, "padded_in_features", linear.in_features)  # int4 pads its input to whole groups
    if in_spans and tensors.get("bias") is not None:
        raise ValueError(f"{name} has a bias and cannot be split by input features")
    if in_spans and n_in != linear.in_features:
        raise ValueError(f"{name} is int4 with its input padded to whole groups and cannot be split by input "
                         "features: quantize with a groupsize that divides its input width per process")
    for key, t in tensors.items():
        if t is None:
            continue
        if key not in AXES:
            raise ValueError(f"tp.py does not know how to split {name}.{key} of {type(linear).__name__}")
        out_axis, in_axis = AXES[key]
        try:
            if out_spans and out_axis is not None:
                t = _take(t, out_axis, linear.out_features, out_spans)
            if in_spans and in_axis is not None:
                t = _take(t, in_axis, n_in, in_spans)
        except ValueError as e:
            raise ValueError(f"cannot split {name}.{key}: {e}")
        if key in linear._parameters:
            linear._parameters[key] = nn.Parameter(t, requires_grad=False)
        else:
            linear._buffers[key] = t
    if out_spans:
        linear.out_features = sum(stop - start for start, stop in out_spans)
    if in_spans:
        linear.in_features = sum(stop - start for start, stop in in_spans)
        if hasattr(linear, "padded_in_features"):
            linear.padded_in_features = linear.in_features


def _split(n: int, rank: int, world_size: int) -> list:
    return [(rank * n // world_size, (rank + 1) * n // world_size)]


# ---------------------------------------------------------------------------------------------------- hooks

# A decode step all-reduces one token's hidden state twice per layer. NCCL takes ~20 us for that inside a CUDA graph
# (measured on H200s), a third of a 7B step at TP2; a one-shot all-reduce over symmetric memory (every GPU copies its
# part into a buffer the others can read over NVLink, then sums them all) is made for such small messages. Messages
# up to ONE_SHOT_MAX_BYTES take it on CUDA; larger ones (prefill) and gloo take NCCL / gloo. 0 turns it off.
ONE_SHOT_MAX_BYTES = 1 << 20
_one_shot_buffer = None


def _one_shot_buffer_for(group_name: str) -> Optional[torch.Tensor]:
    """The symmetric-memory buffer of this process (bfloat16), or None where there is none: CPU, or a PyTorch
    without symmetric memory."""
    global _one_shot_buffer
    if ONE_SHOT_MAX_BYTES <= 0 or dist.get_backend() != "nccl":
        return None
    if _one_shot_buffer is None:
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // 2, dtype=torch.bfloat16, device=torch.cuda.current_device())
            symm_mem.rendezvous(buf, group_name)
        except (ImportError, RuntimeError, AttributeError) as e:
            print(f"tp: symmetric memory unavailable ({type(e).__name__}: {str(e)[:120]}); all-reduce by NCCL",
                  file=sys.stderr)
            buf = False
        _one_shot_buffer = buf
    return _one_shot_buffer if _one_shot_buffer is not False else None


def one_shot_in_use() -> bool:
    return isinstance(_one_shot_buffer, torch.Tensor) and ONE_SHOT_MAX_BYTES > 0


def _all_reduce_hook(group_name: str):
    buf = _one_shot_buffer_for(group_name)

    def hook(module, inputs, output):
        if buf is not None and output.dtype == buf.dtype and output.is_cuda and output.numel() <= buf.numel():
            slot = buf.narrow(0, 0, output.numel()).view(output.shape)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, output.contiguous(), "sum", group_name)
        return funcol.all_reduce(output, "sum", group_name)
    return hook


def _gather_vocab_hook(group_name: str, world_size: int):
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed in torch 2.12

    def hook(module, inputs, output):
        parts = gather(output.contiguous(), 0, group_name)  # [world_size * B, S, V / world_size]
        return torch.cat(parts.chunk(world_size, dim=0), dim=-1)
    return hook


# ---------------------------------------------------------------------------------------------------- the model

def _shard_attention(attn: Attention, name: str, rank: int, world_size: int, group_name: str) -> None:
    n_head, n_kv, d = attn.n_head, attn.n_local_heads, attn.head_dim
    q_per_rank = n_head // world_size
    kv_first, kv_count = _kv_heads_of_rank(n_head, n_kv, rank, world_size)
    q = (rank * q_per_rank * d, (rank + 1) * q_per_rank * d)
    k = ((n_head + kv_first) * d, (n_head + kv_first + kv_count) * d)
    v = ((n_head + n_kv + kv_first) * d, (n_head + n_kv + kv_first + kv_count) * d)
    _shard_linear(attn.wqkv, name + ".wqkv", out_spans=[q, k, v])  # the fused [q; k; v] stays fused, per rank
    _shard_linear(attn.wo, name + ".wo", in_spans=[q])
    attn.wo.register_forward_hook(_all_reduce_hook(group_name))
    attn.n_head, attn.n_local_heads = q_per_rank, kv_count  # q_norm / k_norm act on each head: nothing to split


def _shard_feed_forward(ff: FeedForward, name: str, rank: int, world_size: int, group_name: str) -> None:
    cols = _split(ff.w1.out_features, rank, world_size)
    _shard_linear(ff.w1, name + ".w1", out_spans=cols)
    _shard_linear(ff.w3, name + ".w3", out_spans=cols)
    _shard_linear(ff.w2, name + ".w2", in_spans=cols)
    ff.w2.register_forward_hook(_all_reduce_hook(group_name))


def apply_tp(model: Transformer) -> None:
    """Shard model in place for this rank of the default process group. Call after loading the weights and before
    setup_caches (and, for int4, before quantize.pack_for_device). Raises ValueError when the model cannot be split
    this way: the heads or feed-forward width do not divide, or quantization groups straddle two ranks."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    group_name = dist.group.WORLD.group_name  # a plain string keeps the hooks easy for torch.compile to trace
    if model.max_seq_length != -1:
        raise RuntimeError("apply_tp must come before setup_caches")
    check_splits(model.config, world_size)
    for i, block in enumerate(model.layers):
        _shard_attention(block.attention, f"layers.{i}.attention", rank, world_size, group_name)
        _shard_feed_forward(block.feed_forward, f"layers.{i}.feed_forward", rank, world_size, group_name)
    # The head is the largest single matrix (a quarter of Qwen2.5-0.5B), read whole at every step: split it by
    # vocabulary and gather the logits, a small message. The embedding is a lookup of a few rows: left whole.
    if model.output.out_features % world_size == 0:
        _shard_linear(model.output, "output", out_spans=_split(model.output.out_features, rank, world_size))
        model.output.register_forward_hook(_gather_vocab_hook(group_name, world_size))
