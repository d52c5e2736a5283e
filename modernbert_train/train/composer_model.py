"""ComposerModel around ModernBertForMaskedLM, and the DataSpec that explains our batches to composer.

A loader item is one optimizer step on one rank: {"micro_batches": [mb, ...]} (contract 4). Composer
splits it with `split_batch`, counts real (non-pad) tokens for `tok` durations, and scales each
micro-batch loss by (its loss-generating count) / (mean per-rank total). With
accumulate_train_batch_on_tokens=True and the loss-generating count = masked tokens, the summed
gradient is exactly the gradient of the mean cross-entropy over every masked token of the global
batch (DDP then averages over ranks, which the per-rank mean in the denominator accounts for).

Metrics never read device memory on the host inside a step: every update adds to device-side sums (the
model returns one logit row per masked token, so accuracy is `(argmax == labels).sum()`, no boolean mask),
and compute() sums the ranks' states with one all_reduce instead of torchmetrics' gather, whose shape
checks read the device. Composer computes train metrics once per optimizer step (an all_reduce of two scalars
each, no host read); the only host read is the logger's (metrics.jsonl, one line per step). It adds no wait:
composer 0.32's own step end (`Trainer._accumulate_time_across_ranks`) already reads the step's sample and
token counts on the host with `.item()`, after the optimizer step, on every step.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from composer.core import DataSpec
from composer.models import ComposerModel
from torchmetrics import Metric

from modernbert_train.model import ModernBertForMaskedLM
from modernbert_train.model.flops import training_flops

MICRO_BATCH_KEYS = ("input_ids", "cu_seqlens", "max_seqlen", "labels", "num_tokens", "num_masked", "num_docs")


def micro_batches_of(batch: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The micro-batches of a step item, or [batch] when given a single micro-batch."""
    if "micro_batches" in batch:
        return list(batch["micro_batches"])
    return [batch]


def split_micro_batches(batch: Mapping[str, Any], microbatch_size: int | float) -> list[Mapping[str, Any]]:
    """The loader already cut the step into fixed-shape micro-batches; composer's size is not used."""
    del microbatch_size
    return micro_batches_of(batch)


def real_and_masked_tokens(batch: Mapping[str, Any]) -> dict[str, int]:
    mbs = micro_batches_of(batch)
    return {"total": sum(int(mb["num_tokens"]) for mb in mbs),
            "loss_generating": sum(int(mb["num_masked"]) for mb in mbs)}


def documents_in_batch(batch: Mapping[str, Any]) -> int:
    return sum(int(mb["num_docs"]) for mb in micro_batches_of(batch))


def make_data_spec(loader) -> DataSpec:
    return DataSpec(loader, split_batch=split_micro_batches, get_num_tokens_in_batch=real_and_masked_tokens,
                    get_num_samples_in_batch=documents_in_batch)


class _DeviceSum(Metric):
    """A ratio of two device-side sums, summed over ranks by one all_reduce at compute() (no host read)."""
    full_state_update = False

    def __init__(self, numerator_dtype: torch.dtype):
        super().__init__(sync_on_compute=False)  # compute() reduces itself: see summed_over_ranks
        self.add_state("numerator", default=torch.tensor(0, dtype=numerator_dtype), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def summed_over_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        numerator, total = self.numerator.double(), self.total.double()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            both = torch.stack([numerator, total])
            torch.distributed.all_reduce(both)
            numerator, total = both[0], both[1]
        return numerator, total

    def compute(self) -> torch.Tensor:
        numerator, total = self.summed_over_ranks()
        return (numerator / total.clamp(min=1)).float()


class MaskedAccuracy(_DeviceSum):
    """Share of masked tokens whose argmax is the label; the rows passed in are the masked tokens only."""

    def __init__(self):
        super().__init__(torch.int64)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.numerator += (logits.argmax(dim=-1) == labels).sum()
        self.total += labels.numel()  # a shape: known on the host


class MaskedCrossEntropy(_DeviceSum):
    """Mean cross-entropy over masked tokens, from the model's own (fp32) loss: no second softmax."""

    def __init__(self):
        super().__init__(torch.float64)

    def update(self, mean_loss: torch.Tensor | None, count: int) -> None:
        if count:
            self.numerator += mean_loss.detach().double() * count
            self.total += count


class MaskedPerplexity(MaskedCrossEntropy):
    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def _metric_set() -> dict[str, Metric]:
    return {"masked_accuracy": MaskedAccuracy(), "cross_entropy": MaskedCrossEntropy(),
            "perplexity": MaskedPerplexity()}


class ModernBertMLM(ComposerModel):
    """`.model` is the ModernBertForMaskedLM, so checkpoint keys are 'model.' + transformers' names."""

    def __init__(self, model: ModernBertForMaskedLM):
        super().__init__()
        self.model = model
        self.train_metrics = _metric_set()
        self.eval_metrics = _metric_set()

    def forward(self, batch: Mapping[str, Any]):
        # num_masked is a host-side count from the packer: the model selects masked rows without a sync.
        return self.model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
                          max_seqlen=int(batch["max_seqlen"]), labels=batch["labels"],
                          num_masked=int(batch["num_masked"]))

    def loss(self, outputs, batch: Mapping[str, Any], *args, **kwargs) -> torch.Tensor:
        if int(batch["num_masked"]) == 0:
            # The mean over zero tokens is NaN, and composer scales by 0 / total, which keeps the NaN:
            # a zero that still reaches every parameter keeps DDP's gradient buckets complete.
            return outputs.logits.sum() * 0.0 + sum(p.sum() * 0.0 for p in self.model.parameters())
        return outputs.loss

    def eval_forward(self, batch: Mapping[str, Any], outputs: Any | None = None):
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch: Mapping[str, Any], outputs: Any, metric: Metric) -> None:
        count = int(batch["num_masked"])
        if isinstance(metric, MaskedCrossEntropy):
            metric.update(outputs.loss, count)
        elif count:
            metric.update(outputs.logits.detach(), outputs.masked_labels)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def flops_per_batch(self, batch: Mapping[str, Any]) -> float:
        """Useful training FLOPs (forward + backward = 3x forward) on the real tokens of a step or micro-batch."""
        return float(sum(training_flops(self.model.config, document_lengths(mb), int(mb["num_masked"]))
                         for mb in micro_batches_of(batch)))


def document_lengths(micro_batch: Mapping[str, Any]) -> list[int]:
    """Lengths of the real documents of a packed micro-batch (the trailing padding segment excluded)."""
    if "document_lengths" in micro_batch:  # the loader's host copy: no device sync
        return list(micro_batch["document_lengths"])
    cu = micro_batch["cu_seqlens"]
    bounds = cu.tolist() if torch.is_tensor(cu) else list(cu)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return lengths[: int(micro_batch["num_docs"])]


__all__ = ["ModernBertMLM", "make_data_spec", "split_micro_batches", "real_and_masked_tokens",
           "documents_in_batch", "document_lengths", "MaskedAccuracy", "MaskedCrossEntropy", "MaskedPerplexity"]
