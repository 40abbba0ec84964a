"""Expert parallelism over torch.distributed: each rank holds a contiguous shard of the experts.

Rank r of W holds experts [r·E/W, (r+1)·E/W). A step of ``ep_moe`` on every rank:

1. header exchange (all-to-all of a fixed 8-int record per peer): every rank sees every peer's shard signature
   (local experts, hidden, ffn, dtype), so a mismatch fails on all ranks alike, before any row moves;
2. count exchange (all-to-all of E/W ints per peer): how many rows each peer sends to each of my experts;
3. dispatch (all-to-all of rows): each routed (token, slot) row goes, sorted by expert, to the rank owning it;
4. the local experts run with ``hare.moe`` (GPU kernels on GPU) on whatever arrived;
5. combine (all-to-all back): results return in dispatch order, the sender applies its routing weights in
   float32 and sums over top-k, exactly as ``hare.moe`` does with all experts.

Collective failures (a dead peer, a peer hung past the group's timeout) surface as ``DistributedError`` naming the
phase; ``ep_group`` makes a group with a bounded timeout so that nothing waits forever.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._checks import FLOAT_DTYPES, check_float, check_int
from .blocknm import BlockNM
from .errors import DistributedError, InvalidArgumentError
from .moe import check_bias, moe
from .reference import compute_dtype
from .routing import RoutingLayout, route

_HEADER = 8
_MAGIC = 0x4A4E


def ep_group(timeout_s: float = 60.0, backend: str | None = None) -> dist.ProcessGroup:
    """A process group over all ranks whose collectives give up after ``timeout_s`` instead of waiting forever."""
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s), backend=backend)


def shard_experts(weight, group=None):
    """A copy of this rank's contiguous shard of a stacked expert weight (tensor or BlockNM) of E experts over W
    ranks (a copy, so that the full weight can be freed)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    experts = weight.shape[0]
    if experts % world:
        raise InvalidArgumentError(f"weight: {experts} experts do not split evenly over {world} ranks")
    start, stop = rank * experts // world, (rank + 1) * experts // world
    if isinstance(weight, BlockNM):
        part = weight.select_experts(start, stop)
        return BlockNM(part.values.clone(), part.meta.clone(), part.block_idx.clone(), shape=part.shape,
                       bn=part.bn, bm=part.bm, bw=part.bw)
    return weight[start:stop].clone()


class _Collectives:
    """All-to-all calls that turn a backend failure into a DistributedError naming the phase."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)

    def all_to_all(self, phase: str, send: torch.Tensor, recv_rows=None, send_rows=None, width=()) -> torch.Tensor:
        total = send.shape[0] if recv_rows is None else sum(recv_rows)
        recv = send.new_empty(total, *width)
        try:
            dist.all_to_all_single(recv, send, recv_rows, send_rows, group=self.group)
        except (RuntimeError, dist.DistBackendError) as e:
            raise DistributedError(f"expert parallelism, rank {self.rank}: {phase} failed; a peer rank died, hung past "
                                   f"the group's timeout or left the group ({type(e).__name__}: {e})") from e
        return recv


def _signature(x: torch.Tensor, w_gate_up, w_down) -> list[int]:
    local, two_ffn, hidden = w_gate_up.shape
    return [_MAGIC, local, hidden, two_ffn // 2, FLOAT_DTYPES.index(x.dtype), w_down.shape[0]]


@dataclass
class Dispatched:
    """Rows received for this rank's experts, and what the combine needs to send results home."""

    rows: torch.Tensor  # (received, hidden)
    local_ids: torch.Tensor  # (received,) local expert of each row
    layout: RoutingLayout  # the sender's sort of its (token, slot) rows by global expert
    send_rows: list[int]
    recv_rows: list[int]
    rank: int

    def peer_bytes(self) -> tuple[int, int]:
        """Bytes this rank sends to other ranks in the dispatch and in the combine (rows for itself stay local)."""
        row = self.rows.shape[1] * self.rows.element_size()
        sent, returned = (sum(n for p, n in enumerate(rows) if p != self.rank) for rows in (self.send_rows, self.recv_rows))
        return sent * row, returned * row


def _check_args(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, gate_up_bias_local=None,
                down_bias_local=None) -> None:
    check_float("x", x, ndim=2)
    check_int("topk_ids", topk_ids, ndim=2)
    check_float("topk_weights", topk_weights, ndim=2)
    if w_gate_up_local.shape[0] != w_down_local.shape[0] or len(w_gate_up_local.shape) != 3:
        raise InvalidArgumentError(f"w_gate_up_local {tuple(w_gate_up_local.shape)} and w_down_local "
                                   f"{tuple(w_down_local.shape)} must be stacked shards of the same experts")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != x.shape[0]:
        raise InvalidArgumentError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                                   f"must both be (T, k) with T = {x.shape[0]} tokens of x")
    local, two_ffn, hidden = w_gate_up_local.shape
    check_bias("gate_up_bias_local", gate_up_bias_local, (local, two_ffn))  # before any collective: every rank
    check_bias("down_bias_local", down_bias_local, (local, hidden))        # refuses alike, none waits for another


def dispatch(x, topk_ids, w_gate_up_local, w_down_local, group=None) -> Dispatched:
    """Steps 1-3: check every peer's shard, exchange counts, send each routed row to the rank owning its expert."""
    comm = _Collectives(group)
    world = dist.get_world_size(group)
    local = w_gate_up_local.shape[0]
    dev = x.device

    mine = torch.tensor(_signature(x, w_gate_up_local, w_down_local) + [0] * (_HEADER - 6), dtype=torch.int64)
    headers = comm.all_to_all("header exchange", mine.repeat(world, 1).to(dev), width=(_HEADER,)).cpu()
    bad = [r for r in range(world) if not torch.equal(headers[r], mine)]
    if bad:
        raise DistributedError(f"expert parallelism, rank {comm.rank}: ranks {bad} hold different expert shards "
                               f"(local experts, hidden, ffn, dtype: {headers[bad[0], 1:5].tolist()} there, "
                               f"{mine[1:5].tolist()} here); every rank needs an equal, contiguous shard")

    layout = route(topk_ids, world * local, block=1 << 30)  # sorts the rows by global expert, stably
    send_counts = layout.counts.to(torch.int64)
    recv_counts = comm.all_to_all("count exchange", send_counts).view(world, local)
    send_rows = send_counts.view(world, local).sum(1).tolist()
    recv_rows = recv_counts.sum(1).tolist()
    rows = comm.all_to_all("dispatch", x[layout.gather_index.long()], recv_rows, send_rows, width=(x.shape[1],))
    local_ids = torch.repeat_interleave(torch.arange(local, device=dev).repeat(world), recv_counts.flatten().to(dev))
    return Dispatched(rows, local_ids, layout, send_rows, recv_rows, comm.rank)


def run_local_experts(d: Dispatched, w_gate_up_local, w_down_local, activation: str = "silu", gate_up_bias_local=None,
                      down_bias_local=None) -> torch.Tensor:
    """Step 4: this rank's experts on the rows it received (routing weights are applied by the sender)."""
    ones = torch.ones(d.rows.shape[0], 1, dtype=d.rows.dtype, device=d.rows.device)
    return moe(d.rows, d.local_ids[:, None], ones, w_gate_up_local, w_down_local, activation=activation,
               gate_up_bias=gate_up_bias_local, down_bias=down_bias_local)


def combine(y: torch.Tensor, d: Dispatched, topk_weights: torch.Tensor, group=None) -> torch.Tensor:
    """Step 5: send results home in dispatch order; weight them in float32 and sum over top-k."""
    back = _Collectives(group).all_to_all("combine", y, d.send_rows, d.recv_rows, width=(y.shape[1],))
    num_tokens, top_k = topk_weights.shape
    per_slot = back[d.layout.assignment_row.long()].view(num_tokens, top_k, y.shape[1])
    cdt = compute_dtype(y.dtype)
    return (topk_weights.to(cdt)[..., None] * per_slot.to(cdt)).sum(1).to(y.dtype)


def ep_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up_local, w_down_local,
           group=None, activation: str = "silu", gate_up_bias_local=None, down_bias_local=None) -> torch.Tensor:
    """``hare.moe`` with the experts sharded over the ranks of ``group``; every rank calls it with its own tokens.

    ``topk_ids`` are global expert ids in [0, E), E = W·(local experts). Returns (T, hidden) on this rank, equal to
    ``hare.moe`` on this rank's tokens with all E experts. Any rank may have zero tokens. Expert biases, if any, are
    this rank's shards too (``shard_experts`` of the (E, ·) biases).
    """
    _check_args(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, gate_up_bias_local, down_bias_local)
    d = dispatch(x, topk_ids, w_gate_up_local, w_down_local, group)
    y = run_local_experts(d, w_gate_up_local, w_down_local, activation, gate_up_bias_local, down_bias_local)
    return combine(y, d, topk_weights, group)
