"""Where ranks go on GPUs: a rank per GPU, or whole stages sharing GPUs with
placement.share_gpus; layouts that do not fit the GPUs there are refused before any process
starts, naming both counts. Runs without a GPU: the counts are given."""

from __future__ import annotations

import pytest

from controller.config import ConfigError, check_placement, gpu_slots, load
from workers.main import device_of


def cfg(*sets: str):
    return load(None, list(sets))


def test_a_rank_per_gpu_where_there_are_enough():
    c = cfg('device="cuda"', "parallel.tensor=2", "parallel.pipeline=2")
    check_placement(c, 4)
    assert gpu_slots(c, 4) == 0
    assert [device_of("cuda", r) for r in range(4)] == [f"cuda:{i}" for i in range(4)]
    assert device_of("cuda:1", 2) == "cuda:3"
    assert device_of("cpu", 3) == "cpu"


@pytest.mark.parametrize(
    "sets, gpus, named",
    [
        (["parallel.pipeline=2"], 1, "2 ranks"),
        (["parallel.tensor=2", "parallel.pipeline=2"], 2, "4 ranks"),
        (["parallel.replicas=2"], 1, "2 ranks"),
        ([], 0, "0 visible"),
    ],
)
def test_too_few_gpus_are_refused_naming_both_counts(sets, gpus, named):
    with pytest.raises(ConfigError, match=named) as e:
        check_placement(cfg('device="cuda"', *sets), gpus)
    assert str(gpus) in str(e.value)


def test_a_device_past_the_last_gpu_is_refused():
    with pytest.raises(ConfigError, match="no such GPU"):
        check_placement(cfg('device="cuda:2"'), 2)


def test_shared_gpus_take_whole_stages_round():
    c = cfg(
        'device="cuda"', "parallel.tensor=2", "parallel.pipeline=3", "placement.share_gpus=true"
    )
    check_placement(c, 5)
    slots = gpu_slots(c, 5)
    assert slots == 4  # a multiple of tensor: a stage's two ranks never land on one GPU
    devices = [device_of("cuda", r, slots) for r in range(6)]
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    for stage in range(3):
        assert len(set(devices[2 * stage : 2 * stage + 2])) == 2


def test_shared_gpus_still_need_one_per_tensor_rank():
    c = cfg('device="cuda"', "parallel.tensor=4", "placement.share_gpus=true")
    with pytest.raises(ConfigError, match="parallel.tensor = 4"):
        check_placement(c, 2)


def test_cpu_layouts_need_no_gpu():
    check_placement(cfg("parallel.tensor=2", "parallel.pipeline=2", "parallel.replicas=2"), 0)
