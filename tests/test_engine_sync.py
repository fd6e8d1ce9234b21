"""Host synchronisation of the training and validation loops: device values are read back at log steps only,
and a non-finite loss still stops every rank before the epoch returns."""
from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vig.trainer.engine
from vig.trainer.distributed import DistributedContext
from vig.trainer.engine import Precision, train_one_epoch, validate
from vig.errors import RunError
from vig.trainer.step import PlainLoss, TrainStep

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FLOAT32 = Precision("cpu", None, None)
# every way a value leaves the device for the host (each waits for the device on CUDA)
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _batches(steps: int, batch: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 2, 2, generator=gen), torch.randint(0, 4, (batch,), generator=gen))
            for _ in range(steps)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))


class _NaNAt(nn.Module):
    """Cross-entropy whose `step`-th call (1-based) is NaN."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.calls = 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls == self.step else loss


def _step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer | None = None,
          **options: object) -> TrainStep:
    """The plain-loss training step of ``model`` (SGD at lr 0.1 unless ``optimizer``), float32."""
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainStep(model, optimizer, PlainLoss(loss_fn), FLOAT32, **options)  # type: ignore[arg-type]


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts host reads of tensors (every method in HOST_READS) and collectives (vig.trainer.engine.all_reduce_sum)."""
    counts: Counter = Counter()

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting("read", getattr(torch.Tensor, name)))
    monkeypatch.setattr(vig.trainer.engine, "all_reduce_sum", counting("all_reduce", vig.trainer.engine.all_reduce_sum))
    return counts


@pytest.mark.parametrize("steps, log_interval", [(60, 1000), (60, 7)])
def test_training_reads_the_device_at_log_steps_only(host_reads: Counter, steps: int, log_interval: int) -> None:
    model = _model()
    reference = _model()
    loader = _batches(steps)
    stats = train_one_epoch(0, loader, _step(model, nn.CrossEntropyLoss()), CPU, num_updates=0,
                            log_interval=log_interval)
    log_steps = steps // log_interval + 1  # every log_interval-th step and the last
    assert host_reads["read"] <= log_steps and host_reads["all_reduce"] <= log_steps, host_reads
    host_reads.clear()
    # the device-side sums give the same epoch figures as a plain loop
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    losses = []
    for images, targets in loader:
        loss = nn.functional.cross_entropy(reference(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().double())
    assert (stats.images, stats.num_updates) == (2 * steps, steps)
    torch.testing.assert_close(stats.loss, torch.stack(losses).mean().item(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps, log_interval", [(60, 1000), (60, 7)])
def test_validation_reads_the_device_at_log_steps_only(host_reads: Counter, steps: int, log_interval: int) -> None:
    model = _model().eval()
    loader = _batches(steps)
    stats = validate(model, loader, CPU, FLOAT32, log_interval=log_interval)
    assert host_reads["read"] <= steps // log_interval + 2 and host_reads["all_reduce"] <= 1, host_reads
    host_reads.clear()
    logits = torch.cat([model(images) for images, _ in loader])
    targets = torch.cat([targets for _, targets in loader])
    assert stats.count == 2 * steps
    torch.testing.assert_close(stats.loss, nn.functional.cross_entropy(logits, targets).item(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.top1, 100 * (logits.argmax(1) == targets).double().mean().item(),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad_step, log_interval, found_at", [(3, 4, 4), (4, 4, 4), (9, 4, 10), (1, 1000, 10)])
def test_non_finite_loss_stops_at_the_next_log_step(bad_step: int, log_interval: int, found_at: int) -> None:
    """The error names the first bad step and the log step that found it; the epoch never returns, and at most
    log_interval updates (the bad one included) ran on the way."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RunError, match=rf"^non-finite training loss at epoch 2, step {bad_step} of 10, "
                                       rf"found at step {found_at}; ") as caught:
        train_one_epoch(2, _batches(10), _step(model, _NaNAt(bad_step), optimizer), CPU, num_updates=0,
                        log_interval=log_interval)
    assert "\n" not in str(caught.value)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the bad update did run, in memory


def test_skip_nonfinite_skips_exactly_the_bad_step() -> None:
    model, reference = _model(), _model()
    loader = _batches(10)
    stats = train_one_epoch(0, loader, _step(model, _NaNAt(6), skip_nonfinite=True), CPU, num_updates=0,
                            log_interval=4)
    assert (stats.skipped_steps, stats.num_updates, stats.images) == (1, 9, 18)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for images, targets in loader[:5] + loader[6:]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(images), targets).backward()
        optimizer.step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _two_ranks(rank: int, port: int, folder: str) -> None:
    """Rank 1's loss is NaN at its step 3; both ranks must stop at log step 4 with the same error."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ctx = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    engine_log = logging.getLogger("vig.trainer.engine")
    engine_log.addHandler(logging.FileHandler(os.path.join(folder, f"log{rank}")))
    engine_log.setLevel(logging.INFO)
    try:
        model = _model()
        loss_fn = _NaNAt(3 if rank == 1 else 0)
        try:
            train_one_epoch(0, _batches(10, seed=rank), _step(model, loss_fn), ctx, num_updates=0, log_interval=4)
            outcome = "returned"
        except RunError as err:
            outcome = str(err)
        validate(_model().eval(), _batches(3, seed=rank), ctx, FLOAT32, log_interval=2)
        Path(folder, f"rank{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_two_ranks_stop_together_and_validation_says_whose_share(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # spawn, not fork: a forked pytest worker that already ran autograd cannot run backward in the children
    mp.start_processes(_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    outcomes = {(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)}
    assert len(outcomes) == 1
    assert outcomes.pop().startswith("non-finite training loss at epoch 0, step 3 of 10 (on 1 of 2 ranks), "
                                     "found at step 4;")
    assert "eval (rank 0's share) 2/3 loss" in (tmp_path / "log0").read_text()
    assert not (tmp_path / "log1").read_text()


@pytest.mark.parametrize("steps, accum, bad_step", [(6, 2, None), (7, 3, None), (6, 2, 3), (7, 3, 7)])
def test_gradient_accumulation_updates_once_per_group_and_skips_a_bad_group(steps: int, accum: int,
                                                                           bad_step: int | None) -> None:
    """Groups of `accum` batches (the last one smaller) give one SGD update each, with the gradient of the
    group's mean loss (float64: equal up to summation order); a non-finite loss skips its whole group."""
    model, reference = _model().double(), _model().double()
    loader = [(images.double(), targets) for images, targets in _batches(steps)]
    loss_fn = _NaNAt(bad_step) if bad_step is not None else nn.CrossEntropyLoss()
    step = _step(model, loss_fn, skip_nonfinite=bad_step is not None, grad_accum_steps=accum)
    stats = train_one_epoch(0, loader, step, CPU, num_updates=0, log_interval=2)
    groups = [loader[start:start + accum] for start in range(0, steps, accum)]
    kept = [group for index, group in enumerate(groups)
            if bad_step is None or not index * accum < bad_step <= (index + 1) * accum]
    assert stats.num_updates == len(kept)
    assert stats.skipped_steps == sum(len(group) for group in groups) - sum(len(group) for group in kept)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for group in kept:
        optimizer.zero_grad()
        images = torch.cat([images for images, _ in group])
        targets = torch.cat([targets for _, targets in group])
        nn.functional.cross_entropy(reference(images), targets).backward()
        optimizer.step()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
