"""Every bound a Baton process enforces on what it is sent, declared once.

The config's [limits] section is this record (same key names, same defaults, documented in
configs/minilm.toml); the codec reads its message bounds, the broker's admission its job and
queue bounds. Fields whose metadata says `config: False` are internal to the codec and are not
config keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_STOP_TOKENS = 64  # stop_token_ids of one generate job
# a job's `priority`: 0 (the default, interactive) first, higher numbers later (batch files: 1)
MAX_PRIORITY = 9


@dataclass(slots=True, frozen=True)
class Limits:
    # the first three in this order: processes build Limits(max_message_bytes, max_frames)
    max_message_bytes: int = 16 * 1024 * 1024
    max_frames: int = 8
    # items in any one list of a header: msgpack refuses a longer list from its length prefix,
    # before building it, so a message of millions of tiny items cannot stall a loop
    max_items: int = field(default=1 << 20, metadata={"config": False})
    max_jobs_per_message: int = 1024
    max_text_chars: int = 100_000  # also the most token ids in one prompt
    max_queued: int = 100_000
    max_queued_bytes: int = 128 * 1024 * 1024
    max_ids_per_message: int = 4096
    max_unread_bytes: int = 64 * 1024 * 1024  # per client, beyond what ZeroMQ holds

    def front(self) -> Limits:
        """The codec's bounds for messages from clients: their lists are short (jobs, ids, a
        prompt's token ids), so a longer one is refused by msgpack before it is built."""
        items = max(
            self.max_jobs_per_message,
            self.max_ids_per_message,
            self.max_text_chars,
            MAX_STOP_TOKENS,
        )
        return dataclasses.replace(self, max_items=min(self.max_items, items))


def config_fields() -> list[dataclasses.Field]:
    """The fields of Limits that are config keys ([limits] in the TOML)."""
    return [f for f in dataclasses.fields(Limits) if f.metadata.get("config", True)]
