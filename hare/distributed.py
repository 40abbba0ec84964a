"""Expert parallelism over torch.distributed: each rank holds a contiguous shard of the experts.

Rank r of W holds experts [r·E/W, (r+1)·E/W). A step of ``ep_moe`` on every rank:

1. header exchange (all-to-all of a small int record per peer): every rank sees every peer's signature (local
   experts, hidden, ffn, dtype, top-k), so a mismatch fails on all ranks alike before any row moves, and how many
   rows that peer will send it;
2. dispatch (all-to-all of rows): a token goes once to each rank owning one or more of its k experts, its row
   carrying, for each of those experts, the local expert id and the routing weight;
3. the receiver fans each row out to its local experts (``hare.moe``, GPU kernels on GPU) and sums their results
   weighted in the compute dtype: one partial result per received row;
4. combine (all-to-all back): each token's partials come home, one per rank it went to, and are summed in rank
   order, so the output equals ``hare.moe`` with all experts on this rank's tokens.

A token whose k experts share a rank thus crosses the network once each way, not once per expert. Collective
failures (a dead peer, a peer hung past the group's timeout), group setup included, surface as
``DistributedError`` naming the phase; ``ep_group`` makes a group with a bounded timeout so that nothing waits
forever.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._checks import FLOAT_DTYPES, check_float, check_int, check_same_device, check_topk_ids
from .blocknm import BlockNM
from .errors import DistributedError, InvalidArgumentError
from .moe import check_bias, moe
from .reference import compute_dtype

_MAGIC = 0x4A4E
_SIGNATURE = ("magic", "local experts", "hidden", "ffn", "dtype", "top-k")


def _failure(phase: str, rank: int, error: Exception) -> DistributedError:
    return DistributedError(f"expert parallelism, rank {rank}: {phase} failed; a peer rank died, hung past the "
                            f"group's timeout or left the group ({type(error).__name__}: {error})")


def ep_group(timeout_s: float = 60.0, backend: str | None = None) -> dist.ProcessGroup:
    """A process group over all ranks whose collectives give up after ``timeout_s`` instead of waiting forever.

    Its setup connects the ranks; a peer that dies or never arrives makes it raise ``DistributedError`` too."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise InvalidArgumentError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    if not dist.is_initialized():
        raise DistributedError("expert parallelism: no default process group; call "
                               "torch.distributed.init_process_group first")
    try:
        return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s), backend=backend)
    except RuntimeError as e:  # torch.distributed.DistError and the backends' plain RuntimeErrors
        raise _failure("group setup", dist.get_rank(), e) from e


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
        return BlockNM(part.values.clone(), part.meta.clone(), part.block_idx.clone(), shape=part.shape, **part.params)
    return weight[start:stop].clone()


class _Collectives:
    """All-to-all calls that turn a backend failure into a DistributedError naming the phase."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def all_to_all(self, phase: str, send: torch.Tensor, recv_rows=None, send_rows=None) -> torch.Tensor:
        total = send.shape[0] if recv_rows is None else sum(recv_rows)
        recv = send.new_empty(total, *send.shape[1:])
        try:
            dist.all_to_all_single(recv, send, recv_rows, send_rows, group=self.group)
        except RuntimeError as e:  # torch.distributed.DistError and the backends' plain RuntimeErrors
            raise _failure(phase, self.rank, e) from e
        return recv


def _signature(x: torch.Tensor, topk_ids: torch.Tensor, w_gate_up) -> list[int]:
    local, two_ffn, hidden = w_gate_up.shape
    return [_MAGIC, local, hidden, two_ffn // 2, FLOAT_DTYPES.index(x.dtype), topk_ids.shape[1]]


def _check_headers(signatures: torch.Tensor, mine: list[int], rank: int) -> None:
    """Every peer's signature (W, len(_SIGNATURE)) must equal this rank's; each rank checks all, so all fail alike."""
    bad = [r for r, sig in enumerate(signatures.tolist()) if sig != mine]
    if not bad:
        return

    def show(field: str, value: int) -> str:
        return str(FLOAT_DTYPES[value]) if field == "dtype" and 0 <= value < len(FLOAT_DTYPES) else str(value)

    diff = "; ".join(f"{field} {show(field, a)} there, {show(field, b)} here"
                     for field, a, b in zip(_SIGNATURE, signatures[bad[0]].tolist(), mine) if a != b)
    raise DistributedError(f"expert parallelism, rank {rank}: ranks {bad} hold different expert shards or top-k "
                           f"(rank {bad[0]}: {diff}); every rank needs an equal, contiguous shard of the experts "
                           "and the same top-k")


def _round8(n: int) -> int:
    return -(-n // 8) * 8


class _Wire:
    """The bytes of one dispatch row: up to ``slots`` routing weights (compute dtype) and local expert ids (int32,
    -1 for none), then the token's hidden vector. One uint8 tensor, so that a single all-to-all moves rows and
    routing together; each part starts 8-byte aligned, so both ends view it in place."""

    def __init__(self, hidden: int, dtype: torch.dtype, slots: int):
        self.hidden, self.dtype, self.slots, self.cdt = hidden, dtype, slots, compute_dtype(dtype)
        self.ids_at = slots * self.cdt.itemsize
        self.x_at = _round8(self.ids_at + 4 * slots)
        self.width = self.x_at + _round8(hidden * dtype.itemsize)

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (n, slots), local_ids (n, slots), x (n, hidden)) of a (n, width) uint8 buffer."""
        ids_end, x_end = self.ids_at + 4 * self.slots, self.x_at + self.hidden * self.dtype.itemsize
        return (buf[:, :self.ids_at].view(self.cdt), buf[:, self.ids_at:ids_end].view(torch.int32),
                buf[:, self.x_at:x_end].view(self.dtype))

    def pack(self, weights: torch.Tensor, local_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(x.shape[0], self.width, dtype=torch.uint8, device=x.device)  # padding never uninitialised
        for part, value in zip(self.views(buf), (weights, local_ids, x)):
            part.copy_(value)
        return buf


@dataclass
class SendPlan:
    """How this rank's tokens travel: one row per (token, rank owning one or more of its experts), sorted by rank
    then token, with those experts (local ids, -1 for none) and their routing weights in slot order."""

    token: torch.Tensor  # (n,) source token of each send row
    local_ids: torch.Tensor  # (n, min(k, local)) int32
    weights: torch.Tensor  # (n, min(k, local)) compute dtype
    send_rows: list[int]  # rows for each rank
    return_index: torch.Tensor  # (T, min(W, k)) each token's send rows in rank order, -1 past its last: where
    # its partial results arrive in the return all-to-all


def plan_sends(topk_ids: torch.Tensor, topk_weights: torch.Tensor, world: int, local: int,
               dtype: torch.dtype) -> SendPlan:
    """The ``SendPlan`` of ``topk_ids`` (T, k) over ``world`` ranks of ``local`` experts each, weights in
    ``dtype``."""
    num_tokens, top_k = topk_ids.shape
    dev = topk_ids.device
    ids = topk_ids.long()
    dest = ids // local
    hit = torch.zeros(num_tokens, world, dtype=torch.bool, device=dev).scatter_(1, dest, True)
    rank_of_row, token = hit.t().nonzero(as_tuple=True)  # rank-major, so sorted by rank then token
    rows = torch.arange(token.numel(), device=dev)
    row_of_pair = torch.full((num_tokens, world), -1, dtype=torch.long, device=dev)
    row_of_pair[token, rank_of_row] = rows
    slot_row = row_of_pair.gather(1, dest)
    earlier = torch.ones(top_k, top_k, dtype=torch.bool, device=dev).tril(-1)  # [s, s']: s' before s
    slot_pos = ((dest[:, :, None] == dest[:, None, :]) & earlier).sum(2)  # the slot's place in its row
    slots = min(top_k, local)
    local_ids = torch.full((token.numel(), slots), -1, dtype=torch.int32, device=dev)
    local_ids[slot_row, slot_pos] = (ids % local).to(torch.int32)
    weights = torch.zeros(token.numel(), slots, dtype=dtype, device=dev)
    weights[slot_row, slot_pos] = topk_weights.to(dtype)
    return_index = torch.full((num_tokens, min(world, top_k)), -1, dtype=torch.long, device=dev)
    return_index[token, hit.cumsum(1)[token, rank_of_row] - 1] = rows
    return SendPlan(token, local_ids, weights, hit.sum(0).tolist(), return_index)


def _gather_sum(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = Σ_j weights[i, j] · values[index[i, j]] (index -1 adds nothing) in the compute dtype, in j order (so
    the result does not depend on scheduling) and one (n, hidden) term at a time; in values' dtype."""
    cdt = compute_dtype(values.dtype)
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])  # index -1 reads the zero row
    out = torch.zeros(index.shape[0], values.shape[1], dtype=cdt, device=values.device)
    for j in range(index.shape[1]):
        term = padded[index[:, j]].to(cdt)
        out += term if weights is None else term * weights[:, j, None]
    return out.to(values.dtype)


@dataclass
class Dispatched:
    """Rows received for this rank's experts, and what the combine needs to send results home."""

    rows: torch.Tensor  # (received, hidden) token vectors
    local_ids: torch.Tensor  # (received, slots) local experts of each row, -1 for none
    weights: torch.Tensor  # (received, slots) their routing weights (0 for none)
    plan: SendPlan  # how this rank's own tokens went out
    recv_rows: list[int]  # rows received from each rank
    rank: int
    row_bytes: int  # bytes of one dispatch row

    def peer_bytes(self) -> tuple[int, int]:
        """Bytes this rank sends to other ranks in the dispatch and in the combine (rows for itself stay local)."""
        sent, returned = (sum(n for p, n in enumerate(rows) if p != self.rank)
                          for rows in (self.plan.send_rows, self.recv_rows))
        return sent * self.row_bytes, returned * self.rows.shape[1] * self.rows.element_size()


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
    check_same_device(x=x, topk_ids=topk_ids, topk_weights=topk_weights)
    local, two_ffn, hidden = w_gate_up_local.shape
    check_bias("gate_up_bias_local", gate_up_bias_local, (local, two_ffn))  # before any collective: every rank
    check_bias("down_bias_local", down_bias_local, (local, hidden))        # refuses alike, none waits for another


def dispatch(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, group=None) -> Dispatched:
    """Steps 1-2: check every peer's signature, send each token once to every rank owning one of its experts."""
    comm = _Collectives(group)
    local = w_gate_up_local.shape[0]
    check_topk_ids(topk_ids, comm.world * local)  # this rank's own fault: refused before any collective
    wire = _Wire(x.shape[1], x.dtype, min(topk_ids.shape[1], local))
    plan = plan_sends(topk_ids, topk_weights, comm.world, local, wire.cdt)

    mine = _signature(x, topk_ids, w_gate_up_local)
    header = torch.tensor([mine + [n] for n in plan.send_rows], dtype=torch.int64)  # one record per peer
    headers = comm.all_to_all("header exchange", header.to(x.device)).cpu()
    _check_headers(headers[:, :-1], mine, comm.rank)
    recv_rows = headers[:, -1].tolist()

    send = wire.pack(plan.weights, plan.local_ids, x[plan.token])
    weights, local_ids, rows = wire.views(comm.all_to_all("dispatch", send, recv_rows, plan.send_rows))
    return Dispatched(rows, local_ids, weights, plan, recv_rows, comm.rank, wire.width)


def run_local_experts(d: Dispatched, w_gate_up_local, w_down_local, activation: str = "silu", gate_up_bias_local=None,
                      down_bias_local=None) -> torch.Tensor:
    """Step 3: each received row through its local experts; their results weighted and summed, one row each."""
    row, slot = (d.local_ids >= 0).nonzero(as_tuple=True)
    ones = torch.ones(row.numel(), 1, dtype=d.rows.dtype, device=d.rows.device)
    # the ids were checked on the sending rank, in [0, E); their local ids lie in [0, local)
    y = moe(d.rows[row], d.local_ids[row, slot, None], ones, w_gate_up_local, w_down_local, activation=activation,
            check_ids=False, gate_up_bias=gate_up_bias_local, down_bias=down_bias_local)
    index = torch.full(d.local_ids.shape, -1, dtype=torch.long, device=d.rows.device)
    index[row, slot] = torch.arange(row.numel(), device=d.rows.device)
    return _gather_sum(y, index, d.weights)


def combine(partials: torch.Tensor, d: Dispatched, group=None) -> torch.Tensor:
    """Step 4: send each row's partial result home; sum each token's partials in rank order."""
    back = _Collectives(group).all_to_all("combine", partials, d.plan.send_rows, d.recv_rows)
    return _gather_sum(back, d.plan.return_index)


def ep_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate_up_local, w_down_local,
           group=None, activation: str = "silu", gate_up_bias_local=None, down_bias_local=None) -> torch.Tensor:
    """``hare.moe`` with the experts sharded over the ranks of ``group``; every rank calls it with its own tokens.

    ``topk_ids`` are global expert ids in [0, E), E = W·(local experts). Returns (T, hidden) on this rank, equal to
    ``hare.moe`` on this rank's tokens with all E experts. Any rank may have zero tokens. Expert biases, if any, are
    this rank's shards too (``shard_experts`` of the (E, ·) biases).
    """
    _check_args(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, gate_up_bias_local, down_bias_local)
    d = dispatch(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, group)
    partials = run_local_experts(d, w_gate_up_local, w_down_local, activation, gate_up_bias_local, down_bias_local)
    return combine(partials, d, group)
