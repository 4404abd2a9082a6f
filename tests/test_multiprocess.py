"""Two processes train the tiny pipeline together on CPU (gloo), launched by torchrun.

One launch (tests/scripts/two_process_train.py) trains a LoRA run, then a full fine-tune, on both
ranks; each rank reports what it saw itself. The tests check: two processes really ran, the
class-image work was split (disjoint shares covering every index), gradients were synchronised
(different losses, identical weights), the lr schedule is the single-process one, only rank 0
wrote files, and the saved adapters load and render.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db_adapters.distributed import Processes, processes, rank_seed

SCRIPT = Path(__file__).parent / "scripts" / "two_process_train.py"
STRATEGIES = ("lora", "full")
# The script's own settings plus checkpoints, so that their writes are checked too.
EXTRA = {"checkpoint_every": 2}
LAUNCH_TIMEOUT_S = 300


def _torchrun_available() -> str | None:
    try:
        import torch.distributed as dist
    except ImportError as error:
        return f"torch.distributed is not importable: {error}"
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    if importlib.util.find_spec("torch.distributed.run") is None:
        return "torchrun (torch.distributed.run) is missing"
    return None


def _script_module():
    spec = importlib.util.spec_from_file_location("two_process_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[int, dict]]]:
    """Run the script under torchrun once; returns (OUT, {strategy: {rank: report}})."""
    reason = _torchrun_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("two-process")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(SCRIPT), str(out), *STRATEGIES, json.dumps(EXTRA)]
    # One thread per process: two processes on two cores, as a user would launch them.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    reports: dict[str, dict[int, dict]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("RANK_REPORT "):
            report = json.loads(line.removeprefix("RANK_REPORT "))
            reports.setdefault(report["strategy"], {})[report["rank"]] = report
    return out, reports


@pytest.mark.slow
def test_two_processes_ran_each_knowing_the_world_size(launch):
    _, reports = launch
    assert set(reports) == set(STRATEGIES)
    for per_rank in reports.values():
        assert sorted(per_rank) == [0, 1]
        for rank, report in per_rank.items():
            assert (report["world"], report["accelerate_world"]) == (2, 2)
            assert report["accelerate_rank"] == rank
            assert report["backend"] == "gloo"


@pytest.mark.slow
def test_class_images_were_split_between_ranks_and_cached_once(launch):
    out, reports = launch
    shares = [set(reports["lora"][rank]["share"]) for rank in (0, 1)]
    count = _script_module().SETTINGS["num_class_images"]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(count))
    # The second run found the cache complete: no rank generated anything.
    assert all(not reports["full"][rank]["share"] for rank in (0, 1))
    (folder,) = (out / "class_images").iterdir()
    assert sorted(p.name for p in folder.glob("class_*.png")) == [f"class_{i:05d}.png" for i in range(count)]
    assert (folder / "info.json").is_file()


@pytest.mark.slow
def test_gradients_are_synchronised_while_each_rank_draws_its_own_noise(launch):
    _, reports = launch
    for strategy, per_rank in reports.items():
        # Different data and noise per rank: different losses from the same starting weights...
        assert per_rank[0]["losses"][0] != per_rank[1]["losses"][0], strategy
        # ... yet identical weights after training: the gradients were averaged across ranks.
        assert per_rank[0]["weights"] == per_rank[1]["weights"], strategy


@pytest.mark.slow
def test_lr_schedule_is_the_single_process_one(launch):
    import torch
    from diffusers.optimization import get_scheduler

    _, reports = launch
    settings = _script_module().SETTINGS
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings["learning_rate"])
    schedule = get_scheduler(
        settings["lr_scheduler"],
        optimizer,
        num_warmup_steps=settings["lr_warmup_steps"],
        num_training_steps=settings["steps"],
    )
    expected = []
    for _ in range(settings["steps"]):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    for per_rank in reports.values():
        for report in per_rank.values():
            assert report["lr"] == pytest.approx(expected)


@pytest.mark.slow
def test_only_the_main_process_writes_files(launch):
    out, reports = launch
    for strategy, per_rank in reports.items():
        assert per_rank[1]["writes"] == [], strategy
        assert any(w.endswith(f"{strategy}.safetensors") for w in per_rank[0]["writes"]), strategy
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(f"{s}.safetensors" for s in STRATEGIES)
    for strategy in STRATEGIES:
        run = out / f"run-{strategy}"
        assert sorted(p.name for p in (run / "previews").iterdir()) == ["step_000003_0.png"]
        assert list((run / "checkpoints").glob("*.json")), "checkpoint_every=2 saved no checkpoint"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".db-adapters-")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_two_process_adapter_loads_and_renders(launch, strategy):
    import numpy as np
    from conftest import render_np

    from db_adapters import load_adapter
    from db_adapters.testing import tiny_pipeline

    out, reports = launch
    path = out / f"{strategy}.safetensors"
    base = render_np(tiny_pipeline(seed=0))
    pipe = tiny_pipeline(seed=0)
    adapter = load_adapter(pipe, path)
    assert _script_module().weights_hash(adapter.strategy, pipe) == reports[strategy][0]["weights"]
    rendered = render_np(pipe, f"a {adapter.identifier} dog")
    assert np.isfinite(rendered).all()
    assert not np.allclose(rendered, render_np(tiny_pipeline(seed=0), f"a {adapter.identifier} dog"))
    assert base.shape == rendered.shape
    if strategy == "lora":
        plain = tiny_pipeline(seed=0)
        plain.load_lora_weights(str(path))
        np.testing.assert_allclose(render_np(plain, f"a {adapter.identifier} dog"), rendered, atol=1e-5)


# --- the helpers themselves, in one process ---------------------------------------------------


def test_shares_are_disjoint_and_cover_everything():
    items = list(range(7))
    shares = [Processes(rank=r, world=3).share(items) for r in range(3)]
    assert sorted(i for share in shares for i in share) == items
    assert [len(s) for s in shares] == [3, 2, 2]


def test_rank_seeds_keep_rank_zero_and_differ_elsewhere():
    assert rank_seed(5, 0) == 5
    seeds = {rank_seed(5, r) for r in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_a_plain_process_is_rank_zero_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    procs = processes("cpu")
    assert (procs.rank, procs.world, procs.is_main) == (0, 1, True)
    procs.barrier()  # nothing to wait for
    assert procs.any([True, False]) == [True, False]


def test_a_single_process_state_under_a_two_process_launch_is_refused(monkeypatch):
    import accelerate.state
    from accelerate.utils import DistributedType

    from db_adapters.errors import TrainingError

    class SingleState:  # what a bare PartialState() gives on a CPU-only machine under torchrun
        num_processes, process_index, distributed_type = 1, 0, DistributedType.NO

        def __init__(self, **_):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate.state, "PartialState", SingleState)
    with pytest.raises(TrainingError, match="2 processes were launched.*cpu=True"):
        processes("cpu")
