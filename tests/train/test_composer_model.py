"""The ComposerModel + DataSpec under composer's real gradient accumulation.

Composer scales each micro-batch loss by (its loss-generating count) / (per-rank mean total). These tests
run composer's Trainer for one step and compare the accumulated gradient with the gradient of the mean
cross-entropy over every masked token of the batch, computed directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.model.flops import training_flops
from modernbert_train.train.composer_model import ModernBertMLM, document_lengths, make_data_spec

PAD = 3


def packed_micro_batch(doc_lengths: list[int], budget: int, mask_rate: float, seed: int, vocab: int = 256) -> dict:
    """A contract-4 micro-batch: documents [CLS] ... [SEP], tail padding, masked positions with labels."""
    gen = torch.Generator().manual_seed(seed)
    ids, bounds = [], [0]
    for n in doc_lengths:
        ids += [1] + torch.randint(5, vocab, (n - 2,), generator=gen).tolist() + [2]
        bounds.append(bounds[-1] + n)
    used = bounds[-1]
    if used < budget:
        ids += [PAD] * (budget - used)
        bounds.append(budget)
    input_ids = torch.tensor(ids)
    labels = torch.full((budget,), -100)
    maskable = torch.zeros(budget, dtype=torch.bool)
    maskable[:used] = (input_ids[:used] > 4)
    chosen = maskable & (torch.rand(budget, generator=gen) < mask_rate)
    labels[chosen] = input_ids[chosen]
    input_ids = input_ids.clone()
    input_ids[chosen] = 4
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": input_ids, "cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max()), "labels": labels,
            "num_tokens": used, "num_masked": int(chosen.sum()), "num_docs": len(doc_lengths)}


def concatenate(mbs: list[dict]) -> dict:
    """The same documents as one micro-batch (one flat stream), padding segments kept as segments."""
    offsets, bounds = 0, [0]
    for mb in mbs:
        bounds += (mb["cu_seqlens"][1:] + offsets).tolist()
        offsets += mb["input_ids"].shape[0]
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"input_ids": torch.cat([mb["input_ids"] for mb in mbs]), "cu_seqlens": cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()), "labels": torch.cat([mb["labels"] for mb in mbs]),
            "num_tokens": sum(mb["num_tokens"] for mb in mbs), "num_masked": sum(mb["num_masked"] for mb in mbs),
            "num_docs": sum(mb["num_docs"] for mb in mbs)}


class CaptureGrads(Callback):
    def after_train_batch(self, state, logger):
        self.grads = {n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None}


def make_model() -> ModernBertForMaskedLM:
    torch.manual_seed(0)
    return ModernBertForMaskedLM(ModernBertConfig.preset("micro"))


def composer_grads(step_item: dict) -> dict[str, torch.Tensor]:
    capture = CaptureGrads()
    model = ModernBertMLM(make_model())
    trainer = Trainer(model=model, train_dataloader=make_data_spec([step_item]), max_duration="1ba",
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0), callbacks=[capture], device="cpu",
                      precision="fp32", device_train_microbatch_size=1, accumulate_train_batch_on_tokens=True,
                      progress_bar=False, seed=0)
    trainer.fit()
    trainer.close()
    return capture.grads


def reference_grads(mbs: list[dict]) -> dict[str, torch.Tensor]:
    """Gradient of sum(CE over all masked tokens) / (number of masked tokens), straight through the model."""
    model = ModernBertMLM(make_model())
    total_ce = 0.0
    for mb in mbs:
        out = model(mb)
        total_ce = total_ce + F.cross_entropy(out.logits.float(), out.masked_labels, reduction="sum")
    (total_ce / sum(mb["num_masked"] for mb in mbs)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in a)


def test_gradient_is_mean_over_all_masked_tokens_for_one_or_two_micro_batches():
    # Deliberately unequal masked counts: a per-micro-batch mean would weigh mb_b's few tokens far too much.
    mb_a = packed_micro_batch([40, 50, 30], budget=128, mask_rate=0.5, seed=1)
    mb_b = packed_micro_batch([20, 16], budget=128, mask_rate=0.1, seed=2)
    assert mb_a["num_masked"] > 3 * mb_b["num_masked"] > 0
    reference = reference_grads([mb_a, mb_b])
    two = composer_grads({"micro_batches": [mb_a, mb_b]})
    one = composer_grads({"micro_batches": [concatenate([mb_a, mb_b])]})
    assert max_rel_diff(two, reference) < 1e-5
    assert max_rel_diff(one, reference) < 1e-5
    # The test can fail: weighting micro-batches equally gives a clearly different gradient.
    model = ModernBertMLM(make_model())
    (0.5 * model(mb_a).loss + 0.5 * model(mb_b).loss).backward()
    equal_weights = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max_rel_diff(equal_weights, reference) > 1e-2


def test_micro_batch_without_masked_tokens_adds_nothing():
    mb_a = packed_micro_batch([40, 50], budget=128, mask_rate=0.3, seed=3)
    empty = packed_micro_batch([30], budget=128, mask_rate=0.0, seed=4)
    assert empty["num_masked"] == 0
    with_empty = composer_grads({"micro_batches": [mb_a, empty]})
    assert all(torch.isfinite(g).all() for g in with_empty.values())
    assert max_rel_diff(with_empty, reference_grads([mb_a])) < 1e-5


def test_token_counts_and_flops_cover_real_documents_only():
    mb = packed_micro_batch([40, 50, 30], budget=128, mask_rate=0.3, seed=5)
    spec = make_data_spec([])
    step = {"micro_batches": [mb, mb]}
    assert spec.get_num_tokens_in_batch(step) == 240
    assert spec.get_num_tokens_in_batch(step, token_type="loss_generating") == 2 * mb["num_masked"]
    assert spec.get_num_samples_in_batch(step) == 6
    assert spec.split_batch(step, 1) == [mb, mb]
    assert document_lengths(mb) == [40, 50, 30]  # the 8-token padding segment is not a document
    model = ModernBertMLM(make_model())
    expected = training_flops(model.model.config, [40, 50, 30], mb["num_masked"])
    assert model.flops_per_batch(step) == 2 * expected
    assert model.flops_per_batch(mb) == expected > 0
