"""The peer memory pool: the weights over a worker's budget live once per host, in one shared
memory region that every worker using them maps.

`memory.weight_budget` bounds the weight bytes a worker keeps privately (a fraction of its own
shard's, or bytes). `plan` decides, the same way in every process, which parameters of which
(stage, tensor rank) go to the pool and where each lies in the region: whole units (a layer, the
embeddings, the LM head), the embedding tables first (only a few rows of them are read a token),
then alternate layers, so that a resident layer separates two pooled ones wherever it can.
`baton up` creates the region (a file in /dev/shm, sized by the plan, removed when it stops);
each worker maps it and points its pooled parameters at their places before the checkpoint is
read. The first worker of a (stage, tensor rank) to load, in any replica, writes that shard
straight into shared memory under a lock on its flag, then sets the flag; a later one (another
replica's, or a restart's) finds it set and reads only its private weights, so nothing rewrites
bytes another process is computing with. A worker killed mid-load leaves its flag unset and its
lock released (the kernel drops a dead process's locks): the next one loads the shard again.
On CPU a pooled parameter is used in place from the mapping, or copied ahead of its use into
private buffers with `memory.prefetch = "always"` (workers/prefetch.py). There the worker that
fills a shard also rewrites each weight oneDNN packs in its packed layout (where the bytes fit
the plain ones' room exactly), and marks the shard PACKED: every worker's matmuls then read the
pool as they read a private packed weight (workers/layers/linear.py `Packed.pack_pooled`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from workers.loader import ModelInfo

ALIGN = 4096  # each entry starts on a page: no two entries share a page
FLAGS = ALIGN  # the region's first page: one "filled" byte per (stage, tensor rank)
FILLED, PACKED = 1, 2  # a shard's flag once filled: its weights plain, or oneDNN-packed too
_LAYER = re.compile(r"layers\.(\d+)\.")


class PoolError(ValueError):
    pass


@dataclass(slots=True)
class Unit:
    """Parameters pooled or kept together: one layer's, or one top-level module's."""

    name: str
    params: list[tuple[str, torch.Tensor]]
    layer: int | None  # position among the stage's layers, for layers
    lookup: bool = False  # read by index only (embeddings, norms): as cheap from the pool
    # bytes kept privately beside its own while it is private: a screened LM head's int8 copy
    extra: int = 0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p in self.params)

    @property
    def private_bytes(self) -> int:
        """What keeping it private costs: its weights, and what is kept beside them."""
        return self.nbytes + self.extra


@dataclass(slots=True, frozen=True)
class Entry:
    param: str  # parameter name within its stage
    offset: int  # bytes into the region
    nbytes: int


def units(model: nn.Module) -> list[Unit]:
    """The stage's parameters grouped: one unit per layer, one per other top-level module."""
    out: dict[str, Unit] = {}
    layer_ids: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = unit_of(name)
        if key not in out:
            if _LAYER.match(name):
                layer_ids[key] = len(layer_ids)
            out[key] = Unit(key, [], layer_ids.get(key))
        out[key].params.append((name, p))
    for u in out.values():
        module = model.get_submodule(u.name)
        # no matmul in it (a linear layer has `pack`): only rows of it are read per token
        u.lookup = u.layer is None and not any(hasattr(m, "pack") for m in module.modules())
    return list(out.values())


def unit_of(param: str) -> str:
    """The unit a parameter belongs to: its layer ("layers.3"), or its top-level module."""
    m = _LAYER.match(param)
    return m.group(0)[:-1] if m else param.split(".")[0]


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def budget_bytes(budget: float, total: int) -> int:
    """`memory.weight_budget`: <= 1 a fraction of the shard's weight bytes, else bytes."""
    return int(budget * total) if budget <= 1 else int(budget)


def screen_copy(unit: Unit) -> int:
    """The bytes of the int8 copy a screened LM head keeps beside its weight [words, dim]: a
    byte a value, and a scale, a zero point, a radius and a size a word
    (workers/layers/screen.py `Int8Copy`)."""
    words, dim = next(p.shape for n, p in unit.params if n.endswith("weight"))
    return words * dim + 20 * words


def choose(shard: list[Unit], budget: float, layers_only: bool = False) -> list[Unit]:
    """The units to pool so that what stays private fits the budget: first those read by index
    (the embedding tables: a few rows a token, as cheap from the pool), largest first; then
    alternate layers (the second, fourth, ...), so that a resident layer separates pooled ones
    while it can; then the other layers; then the rest (the LM head), largest first.

    `layers_only` (a GPU: what it computes with must be copied in, and only layers are, in turn
    ahead of their use): only layers; PoolError, naming the bytes, when the rest alone is over
    the budget."""
    if budget == 1:  # the default, no pool: every weight private, a screen's copy with them
        return []
    keep = budget_bytes(budget, sum(u.nbytes for u in shard))
    layers = [u for u in shard if u.layer is not None]
    rest = sorted((u for u in shard if u.layer is None), key=lambda u: -u.nbytes)
    alternate = [u for u in layers if u.layer % 2 == 1] + [u for u in layers if u.layer % 2 == 0]
    if layers_only:
        stays = sum(u.private_bytes for u in rest)
        if stays > keep:
            raise PoolError(
                f"memory.weight_budget keeps {keep} bytes of a shard private, but on a GPU "
                f"{stays} bytes of it stay there (embeddings, norms, LM head: only layers are "
                f"pooled): the budget must be at least {stays} bytes"
            )
        order = alternate
    else:
        order = [u for u in rest if u.lookup] + alternate + [u for u in rest if not u.lookup]
    pooled, private = [], sum(u.private_bytes for u in shard)
    for u in order:
        if private <= keep:
            break
        pooled.append(u)
        private -= u.private_bytes
    return pooled


@dataclass(slots=True)
class Plan:
    """Where every pooled parameter of every (stage, tensor rank) lies in the region."""

    entries: dict[tuple[int, int], list[Entry]]
    flags: dict[tuple[int, int], int]  # where each shard's "filled" byte lies in the region
    size: int  # bytes of the region
    private: dict[tuple[int, int], int]  # weight bytes each rank keeps privately
    pooled: dict[tuple[int, int], int]  # weight bytes each rank has in the pool

    def of(self, stage: int, tp_rank: int) -> list[Entry]:
        return self.entries.get((stage, tp_rank), [])


def plan(
    shards: dict[tuple[int, int], nn.Module],
    budget: float,
    layers_only: bool = False,
    screen: bool = False,
) -> Plan:
    """`shards`: each (stage, tensor rank)'s model, built on the meta device (shapes only).
    `screen`: a private LM head is screened, and its int8 copy counts against the budget (a
    pooled head is not screened: it keeps no copy)."""
    entries: dict[tuple[int, int], list[Entry]] = {}
    flags = {key: i for i, key in enumerate(sorted(shards))}
    if len(flags) > FLAGS:
        raise PoolError(f"{len(flags)} shards: the pool has flags for {FLAGS}")
    private, pooled = {}, {}
    offset = FLAGS
    for key in sorted(shards):
        shard = units(shards[key])
        for u in shard:
            if screen and u.name == "lm_head":
                u.extra = screen_copy(u)
        chosen = choose(shard, budget, layers_only)
        entries[key] = []
        for u in chosen:
            for name, p in u.params:
                entries[key].append(Entry(name, offset, p.nbytes))
                offset += round_up(p.nbytes, ALIGN)
        pooled[key] = sum(u.nbytes for u in chosen)
        private[key] = sum(u.private_bytes for u in shard) - sum(u.private_bytes for u in chosen)
    size = offset if any(entries.values()) else 0  # nothing pooled: no region at all
    return Plan(entries, flags, size, private, pooled)


def layout(
    info: ModelInfo,
    tensor: int,
    pipeline: int,
    dtype: str,
    stages: list[int] | None,
    budget: float,
    device: str = "cpu",
    screen: bool = False,
) -> Plan:
    """The plan for this model and layout, made on the meta device, the same in every process.
    On CPU any positive budget can be kept to: all of a shard can live in the pool; on a GPU
    only layers can (`choose`). The copier's buffers (`memory.prefetch = "always"`, and always
    on a GPU) come on top, and `baton status` counts them. `screen`: whether a private LM head
    keeps the screen's int8 copy (workers/layers/screen.py `screens`), counted as private."""
    from workers.models import shapes  # the models import this module

    if budget <= 0:
        raise PoolError(f"memory.weight_budget must be positive, got {budget}")
    shards = shapes(info, tensor, pipeline, getattr(torch, dtype), stages)
    return plan(shards, budget, layers_only=not device.startswith("cpu"), screen=screen)


def path_for(run_dir: Path) -> Path:
    """The pool of the fleet whose private run directory is `run_dir`: named after it, in the
    host's shared memory."""
    return Path("/dev/shm") / f"{run_dir.name}.pool"


def check_room(path: Path, size: int) -> None:
    """Refuse before anything starts where the region cannot be made."""
    try:
        st = os.statvfs(path.parent)
    except OSError as e:
        raise PoolError(
            f"the pool needs {size} bytes of shared memory in {path.parent}: {e}"
        ) from None
    free = st.f_bavail * st.f_frsize
    if free < size:
        raise PoolError(
            f"the pool needs {size} bytes of shared memory; {path.parent} has {free} free"
        )


class Region:
    """The pool's shared memory, mapped: `create` (by `baton up`) or `open` (by a worker)."""

    def __init__(self, path: Path, size: int, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # sparse: pages come into being as they are written
            elif os.fstat(fd).st_size < size:
                raise PoolError(f"the pool {path} holds {os.fstat(fd).st_size} bytes, not {size}")
            self.map = mmap.mmap(fd, size) if size else None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # kept for the shards' locks (workers), closed with the mapping
        self.pinned = False

    @contextmanager
    def locked(self, offset: int) -> Iterator[None]:
        """Hold an exclusive lock on the byte at `offset` (released by the kernel, too, when
        the holder dies)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)

    @classmethod
    def create(cls, path: Path, size: int) -> Region:
        check_room(path, size)
        return cls(path, size, create=True)

    @classmethod
    def open(cls, path: Path, size: int) -> Region:
        return cls(path, size, create=False)

    def pin(self) -> None:
        """Register the mapping with the CUDA driver (page-locked): copies from it to a GPU run
        as DMA at full speed, asynchronously on the copier's stream. Once per process."""
        if self.map is None or self.pinned:
            return
        whole = torch.frombuffer(self.map, dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(whole.data_ptr(), whole.numel(), 0)
        if int(err) != 0:
            raise PoolError(f"the pool {self.path} could not be pinned for CUDA (error {err})")
        self.pinned = True

    def tensor(self, entry: Entry, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped as `like` over the entry's bytes of the region (shared, not copied)."""
        if entry.nbytes != like.nbytes:
            raise PoolError(
                f"{entry.param}: {entry.nbytes} bytes in the pool, {like.nbytes} wanted"
            )
        raw = torch.frombuffer(self.map, dtype=torch.uint8, count=entry.nbytes, offset=entry.offset)
        return raw.view(like.dtype).view(like.shape)

    def close(self) -> None:
        """Unmap. Tensors over the region must be gone first (mmap refuses while they live)."""
        if self.pinned:
            whole = torch.frombuffer(self.map, dtype=torch.uint8)
            torch.cuda.cudart().cudaHostUnregister(whole.data_ptr())
            del whole
            self.pinned = False
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Pooled:
    """One worker's share of the pool: the region, mapped, and its entries in it."""

    region: Region
    entries: list[Entry]
    flag: int  # offset of the shard's "filled" byte
    # whether the shard's weights that oneDNN packs lie in the region in its layout (its flag
    # byte says PACKED): set by the worker that fills it, read from the flag by the others
    packed: bool = False

    @classmethod
    def of(cls, region: Region, plan: Plan, stage: int, tp_rank: int) -> Pooled | None:
        """The share of (stage, tp_rank); None where that shard has nothing in the pool."""
        entries = plan.of(stage, tp_rank)
        return cls(region, entries, plan.flags[stage, tp_rank]) if entries else None

    @property
    def names(self) -> set[str]:
        return {e.param for e in self.entries}

    @property
    def units(self) -> list[str]:
        return unit_names(self.entries)

    def place(self, model: nn.Module) -> None:
        """Point each pooled parameter of `model` (built, not yet loaded) at its place in the
        region, so that loading the checkpoint writes it there."""
        params = dict(model.named_parameters())
        for e in self.entries:
            p = params[e.param]
            p.data = self.region.tensor(e, p.data)
            p.pooled = True

    @contextmanager
    def filling(self) -> Iterator[bool]:
        """Under the shard's lock: yields whether its bytes are still to be written (by the
        caller, inside the block); marks them written when the block ends without error."""
        with self.region.locked(self.flag):
            empty = self.region.map[self.flag] == 0
            yield empty
            if empty:
                self.region.map[self.flag] = PACKED if self.packed else FILLED
            self.packed = self.region.map[self.flag] == PACKED


def pooled(p: torch.Tensor | None) -> bool:
    return p is not None and getattr(p, "pooled", False)


def unit_names(entries: list[Entry]) -> list[str]:
    """The units these entries hold (`baton status` shows a worker's), its layers in order."""
    names = {unit_of(e.param) for e in entries}
    return sorted(names, key=lambda u: (u.startswith("layers."), _number(u), u))


def _number(unit: str) -> int:
    tail = unit.rpartition(".")[2]
    return int(tail) if tail.isdigit() else -1
