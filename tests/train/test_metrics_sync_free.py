"""Train metrics never read device memory on the host inside a step (issue 12, item 1).

On a GPU a boolean-mask index, `.item()`, `bool(tensor)` or `.tolist()` waits for the device. CPU tensors
never wait, so these tests make every such read raise while a step's metric updates run; bench/gpu_check.sh
runs whole training steps under torch.cuda.set_sync_debug_mode("error") for the real thing.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from composer.metrics.nlp import MaskedAccuracy as ComposerMaskedAccuracy

from modernbert_train.train.composer_model import ModernBertMLM
from tests.train.test_composer_model import make_model, packed_micro_batch


class HostRead(AssertionError):
    pass


def _is_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


@contextlib.contextmanager
def no_host_reads():
    """Every Tensor operation that makes the host wait for the device raises HostRead."""
    def refuse(name):
        def method(*args, **kwargs):
            raise HostRead(f"host read of a tensor: {name}")
        return method

    getitem = torch.Tensor.__getitem__

    def guarded_getitem(self, index):
        if _is_bool_index(index):
            raise HostRead("boolean-mask indexing (its output size needs the device's count)")
        return getitem(self, index)

    patches = {name: refuse(name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero",
                                               "masked_select", "numpy", "cpu")}
    patches["__getitem__"] = guarded_getitem
    saved = {name: getattr(torch.Tensor, name) for name in patches}
    functions = {name: getattr(torch, name) for name in ("nonzero", "masked_select")}
    try:
        for name, method in patches.items():
            setattr(torch.Tensor, name, method)
        for name in functions:
            setattr(torch, name, refuse(f"torch.{name}"))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        for name, function in functions.items():
            setattr(torch, name, function)


def test_guard_catches_boolean_masks_and_item():
    x, mask = torch.arange(4), torch.tensor([True, False, True, False])
    with no_host_reads():
        with pytest.raises(HostRead):
            x[mask]
        with pytest.raises(HostRead):
            x.sum().item()
        with pytest.raises(HostRead):
            bool(x.sum() > 0)
        # composer's MaskedAccuracy, which the train metrics used before: target[mask] reads the device.
        with pytest.raises(HostRead):
            ComposerMaskedAccuracy(ignore_index=-100).update(torch.randn(5, 9), torch.tensor([1, -100, 3, 4, 5]))
        assert torch.equal(x[1:3] + 1, torch.tensor([2, 3]))  # ordinary indexing is fine


def test_train_metric_updates_of_a_step_do_not_read_the_device_and_are_right():
    composer_model = ModernBertMLM(make_model())
    micro_batches = [packed_micro_batch([40, 30, 20], 128, 0.3, seed=s) for s in (1, 2)]
    micro_batches.append(packed_micro_batch([20], 128, 0.0, seed=3))  # no masked token at all
    outputs = [composer_model(mb) for mb in micro_batches]
    metrics = composer_model.get_metrics(is_train=True)
    assert set(metrics) == {"masked_accuracy", "cross_entropy", "perplexity"}
    with no_host_reads():
        for mb, out in zip(micro_batches, outputs):
            for metric in metrics.values():
                composer_model.update_metric(mb, out, metric)
        computed = {name: metric.compute() for name, metric in metrics.items()}
    # The same numbers straight from the micro-batches.
    labels = torch.cat([out.masked_labels for out in outputs])
    predictions = torch.cat([out.logits.argmax(-1) for out in outputs])
    counts = [mb["num_masked"] for mb in micro_batches]
    assert labels.numel() == sum(counts) > 0
    assert computed["masked_accuracy"].item() == pytest.approx((predictions == labels).double().mean().item(), abs=1e-7)
    mean_loss = sum(out.loss.item() * n for out, n in zip(outputs, counts) if n) / sum(counts)
    assert computed["cross_entropy"].item() == pytest.approx(mean_loss, rel=1e-6)
    assert computed["perplexity"].item() == pytest.approx(torch.tensor(mean_loss).exp().item(), rel=1e-6)


def _two_rank_metrics(rank: int, store: str, results) -> None:
    import torch.distributed as dist

    from modernbert_train.train.composer_model import MaskedAccuracy, MaskedCrossEntropy

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        accuracy, cross_entropy = MaskedAccuracy(), MaskedCrossEntropy()
        # rank 0: 3 of 4 right, loss 1.0 over 4 tokens; rank 1: 0 of 2 right, loss 4.0 over 2 tokens
        logits = torch.eye(5)[[1, 2, 3, 0]] if rank == 0 else torch.eye(5)[[1, 1]]
        labels = torch.tensor([1, 2, 3, 4]) if rank == 0 else torch.tensor([0, 0])
        accuracy.update(logits, labels)
        cross_entropy.update(torch.tensor(1.0 if rank == 0 else 4.0), labels.numel())
        results[rank] = (accuracy.compute().item(), cross_entropy.compute().item())
    finally:
        dist.destroy_process_group()


def test_metrics_are_summed_over_ranks(tmp_path):
    """compute() all_reduces the sums (no torchmetrics gather): the global ratio on every rank."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_two_rank_metrics, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == (pytest.approx(3 / 6), pytest.approx((4 * 1.0 + 2 * 4.0) / 6))
