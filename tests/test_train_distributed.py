"""Training under torchrun and torch.distributed.launch (2 CPU processes, gloo): the published recipe, ranks
that stay in step, warnings logged once, restarts with the launcher's shared store."""
from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from tests.train_helpers import REPO_ROOT, child_env, last_json_line, make_image_folder, run_train
from vig.trainer.distributed import ROUND_KEY, agree_on_round

TRAIN_IMAGES = 18  # RepeatAugSampler: ceil(18 / 2) = 9 per process and epoch, 2 batches of 4
VAL_IMAGES = 7  # shards of 4 and 3: nothing padded, nothing counted twice

RECIPE = (
    "--model vig_ti_224_gelu --sched cosine --epochs 2 --opt adamw -j 1 --warmup-lr 1e-6 --mixup .8 --cutmix 1.0 "
    "--model-ema --model-ema-decay 0.99996 --aa rand-m9-mstd0.5-inc1 --color-jitter 0.4 --warmup-epochs 1 "
    "--opt-eps 1e-8 --repeated-aug --remode pixel --reprob 0.25 --amp --lr 2e-3 --weight-decay .05 --drop 0 "
    "--drop-path .1 -b 4 --start-thresh 0.9 --dec 0.01 --img-size 32"
).split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher(kind: str) -> list[str]:
    module = "torch.distributed.run" if kind == "torchrun" else "torch.distributed.launch"
    return ["-m", module, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet-like")
    return make_image_folder(root, {"train": {"a": 9, "b": 9}, "val": {"a": 4, "b": 3}})


def _check_run_folder(folder: Path) -> None:
    for name in ("args.yaml", "summary.csv", "curves.png", "last.pth.tar", "model_best.pth.tar"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in folder.glob("checkpoint-*.pth.tar")) == ["checkpoint-0.pth.tar",
                                                                         "checkpoint-1.pth.tar"]
    with open(folder / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert set(rows[0]) == {"epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr",
                            "ema_eval_loss", "ema_eval_top1", "ema_eval_top5"}
    state = torch.load(folder / "last.pth.tar", weights_only=True)
    assert {"state_dict", "state_dict_ema", "optimizer", "scheduler", "epoch", "arch", "args", "metric"} <= set(state)
    assert (state["epoch"], state["arch"], state["args"]["start_thresh"]) == (1, "vig_ti_224_gelu", 0.9)
    assert not any(key.startswith("module.") for key in state["state_dict"])


def _check_log(stderr: str) -> None:
    assert stderr.count("epoch 0: train loss") == 1, stderr[-3000:]  # only rank 0 reports
    # shards of 9 in batches of 4: 8 images trained and 1 left out on each of the 2 ranks
    assert re.search(rf"epoch 1: train loss [\d.]+ = mean over the {2 * 8} images trained in this epoch by 2 "
                     r"process\(es\) \(2 more in incomplete last batches, not trained\)", stderr), stderr
    assert stderr.count(f"validation {VAL_IMAGES} images") == 2
    assert "MACs" in stderr
    assert "AMP: bfloat16 autocast on CPU" in stderr or "falling back to float32" in stderr


@pytest.mark.slow
def test_recipe_under_torchrun_then_evaluate(tmp_path: Path, image_folder: Path) -> None:
    output = tmp_path / "out"
    result = run_train([str(image_folder), *RECIPE, "--output", str(output), "--experiment", "run"],
                       launcher=_launcher("torchrun"))
    assert result.returncode == 0, result.stderr[-4000:]
    _check_run_folder(output / "run")
    _check_log(result.stderr)

    evaluation = run_train([str(image_folder), "--model", "vig_ti_224_gelu", "--img-size", "32", "-j", "1",
                            "--amp", "-b", "2", "--pretrain_path", str(output / "run" / "model_best.pth.tar"),
                            "--evaluate", "--start-thresh", "0.9", "--dec", "0.01", "--model-ema"],
                           launcher=_launcher("torchrun"))
    assert evaluation.returncode == 0, evaluation.stderr[-4000:]
    assert evaluation.stdout.count('"count"') == 1  # one result, from rank 0
    assert last_json_line(evaluation.stdout)["count"] == VAL_IMAGES


@pytest.mark.slow
def test_recipe_under_distributed_launch_with_dated_folder(tmp_path: Path, image_folder: Path) -> None:
    output = tmp_path / "out"
    result = run_train([str(image_folder), *RECIPE, "--output", str(output)], launcher=_launcher("launch"))
    assert result.returncode == 0, result.stderr[-4000:]
    folders = list(output.iterdir())
    assert len(folders) == 1 and re.fullmatch(r"\d{8}-\d{6}-vig_ti_224_gelu-32", folders[0].name), folders
    _check_run_folder(folders[0])
    _check_log(result.stderr)


def _train_two_workers(tmp_path: Path, image_folder: Path, flags: list[str]) -> tuple[list[dict], str]:
    """Train with tests/train_worker.py on 2 torchrun ranks into tmp_path/out/run; each rank's saved record
    (initial and final weights, ...) and the launcher's whole output."""
    weights = tmp_path / "weights"
    weights.mkdir()
    command = [sys.executable, *_launcher("torchrun"), str(REPO_ROOT / "tests" / "train_worker.py"), str(weights),
               str(image_folder), *flags, "--output", str(tmp_path / "out"), "--experiment", "run"]
    result = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return [torch.load(weights / f"rank{rank}.pth", weights_only=True) for rank in (0, 1)], output


SYNC_FLAGS = ("--model vig_ti_224_gelu --img-size 32 --allow-small-graph --epochs 1 --warmup-epochs 0 --lr 1e-3 -b 4 -j 0 "
              "--model-ema --model-ema-decay 0.9").split()


@pytest.mark.slow
def test_two_ranks_train_to_bit_identical_weights_and_log_the_knn_cap_once(tmp_path: Path,
                                                                          image_folder: Path) -> None:
    ranks, output = _train_two_workers(tmp_path, image_folder, SYNC_FLAGS)
    # 32 px gives 2 x 2 graph nodes: both ranks build the model, the cap warning appears once in all their output
    assert output.count("4 graph nodes cap the kNN schedule") == 1, output[-4000:]

    initial = ranks[0]["initial"]
    assert any(not torch.equal(value, ranks[1]["initial"][key]) for key, value in initial.items())  # seeded by rank
    for entry in ("model", "ema"):
        _assert_in_step_and_trained(ranks, entry)


def _assert_in_step_and_trained(ranks: list[dict], entry: str) -> None:
    """Both ranks' final ``entry`` weights are bit-identical, and every floating tensor left rank 0's start."""
    initial = ranks[0]["initial"]
    assert ranks[0][entry].keys() == ranks[1][entry].keys() == initial.keys()
    unequal = [key for key in initial if not torch.equal(ranks[0][entry][key], ranks[1][entry][key])]
    assert not unequal, f"{entry}: rank 0 and rank 1 differ in {unequal[:5]}"
    unchanged = [key for key, value in initial.items()
                 if value.is_floating_point() and torch.equal(ranks[0][entry][key], value)]
    assert not unchanged, f"{entry}: still the initial weights in {unchanged[:5]}"


BGNN_FLAGS = ("--model bgnn --model-kwargs backbone=mobilenetv3_small_050 edge_features=8 --img-size 32 --epochs 1 "
              "--warmup-epochs 0 --lr 1e-3 -b 4 -j 0 --mixup 0.8 --edge-loss-weight 1").split()


@pytest.mark.slow
def test_two_ranks_train_bgnn_in_step_with_the_edge_loss_over_each_ranks_own_batch(tmp_path: Path,
                                                                                   image_folder: Path) -> None:
    ranks, _ = _train_two_workers(tmp_path, image_folder, BGNN_FLAGS)
    for rank in ranks:  # 9 images per rank in batches of 4: 2 steps, each an edge target over 4 images, not 8
        assert [edge.shape for _, edge in rank["edge_targets"]] == [(4, 4), (4, 4)]
        for targets, edge in rank["edge_targets"]:
            assert targets.shape == (4, 2)  # this rank's mixed label vectors
    shards = [torch.cat([targets for targets, _ in rank["edge_targets"]]) for rank in ranks]
    assert not torch.equal(shards[0], shards[1])  # each rank built its target from its own batch
    _assert_in_step_and_trained(ranks, "model")
    with open(tmp_path / "out" / "run" / "summary.csv", newline="") as handle:
        assert float(next(csv.DictReader(handle))["train_edge_loss"]) > 0


def _old_group_completed(store: dist.Store, world_size: int) -> None:
    _agree_in_threads(store, world_size, timedelta(seconds=10))


def _old_group_smaller(store: dist.Store, world_size: int) -> None:
    _agree_in_threads(store, world_size - 1, timedelta(seconds=10))


def _old_rank_1_killed_before_joining(store: dist.Store, world_size: int) -> None:
    with pytest.raises(dist.DistStoreError):
        agree_on_round(store, 0, world_size, timedelta(seconds=0.2))


def _old_rank_0_killed_before_opening(store: dist.Store, world_size: int) -> None:
    with pytest.raises(dist.DistStoreError):
        agree_on_round(store, 1, world_size, timedelta(seconds=0.2))


def _old_rank_0_killed_after_all_joined(store: dist.Store, world_size: int) -> None:
    round_index = store.add(ROUND_KEY, 1)
    store.add(f"{ROUND_KEY}/{round_index}/{world_size}/joined", world_size - 1)


def _agree_in_threads(store: dist.Store, world_size: int, timeout: timedelta) -> list[int]:
    """agree_on_round on every rank, one thread each; the other ranks start 50 ms before rank 0, so they
    first see what an earlier group left in the store."""
    with ThreadPoolExecutor(world_size) as pool:
        others = [pool.submit(agree_on_round, store, rank, world_size, timeout) for rank in range(1, world_size)]
        time.sleep(0.05)
        first = pool.submit(agree_on_round, store, 0, world_size, timeout)
        return [first.result(), *(future.result() for future in others)]


@pytest.mark.parametrize("earlier", [None, _old_group_completed, _old_group_smaller, _old_rank_1_killed_before_joining,
                                     _old_rank_0_killed_before_opening, _old_rank_0_killed_after_all_joined],
                         ids=lambda earlier: earlier.__name__.lstrip("_") if earlier else "fresh_store")
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_of_a_restarted_group_agree_on_a_fresh_round(earlier: Callable[[dist.Store, int], None] | None,
                                                          world_size: int) -> None:
    store = dist.HashStore()
    if earlier is not None:
        earlier(store, world_size)
    opened_before = store.add(ROUND_KEY, 0)
    rounds = _agree_in_threads(store, world_size, timedelta(seconds=10))
    assert rounds == [opened_before + 1] * world_size


@pytest.mark.slow
def test_restart_when_the_agents_count_restarts_differently(tmp_path: Path) -> None:
    """Two agents on one shared store, with two processes and one; the second agent's process dies once. Only
    that agent counts the restart (pytorch/pytorch#135712), yet the restarted ranks form one process group."""
    endpoint = f"127.0.0.1:{_free_port()}"

    def agent(processes: int, *worker_flags: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={processes}",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=restart-test", "--max-restarts=1",
                   "--monitor-interval=0.1", str(REPO_ROOT / "tests" / "restart_worker.py"), str(tmp_path),
                   *worker_flags]
        return subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    agents = [agent(2), agent(1, "--die")]
    try:
        outputs = [launcher.communicate(timeout=240)[0] for launcher in agents]
    finally:
        for launcher in agents:  # a launcher that hangs is stopped together with its workers
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    assert [launcher.returncode for launcher in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    survivor, restarted = (re.findall(r"restart count (\d+): sum (\d+)", output) for output in outputs)
    assert survivor == [("0", "3")] * 4, outputs[0][-3000:]  # two processes, two rounds
    assert restarted == [("0", "3"), ("1", "3")], outputs[1][-3000:]
