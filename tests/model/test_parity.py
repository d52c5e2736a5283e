"""Our model is the same function as transformers' ModernBertForMaskedLM, on padded and packed input."""
import pytest
import torch
import transformers

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, available_backends
from modernbert_train.model.attention import HALF_PRECISION_BACKENDS
from modernbert_train.model.hf import config_to_hf_dict

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Longer than the micro preset's window (8 tokens) so local and global layers differ.
LENGTHS = [40, 17, 25, 3, 33]


def make_pair(device="cpu", attn_backend="sdpa", hf_attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModernBertConfig.preset("micro", attn_backend=attn_backend, **overrides)
    ours = ModernBertForMaskedLM(config)
    # Non-trivial norms and biases so a swapped or missing parameter cannot hide.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf_config = transformers.ModernBertConfig(**{k: v for k, v in config_to_hf_dict(config).items() if k != "architectures"})
    hf_config._attn_implementation = hf_attn
    theirs = transformers.ModernBertForMaskedLM(hf_config)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device).eval(), theirs.to(device).eval()


def padded_batch(lengths, vocab=256, pad_id=3, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    batch, seq = len(lengths), max(lengths)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids[mask == 0] = pad_id
    return ids.to(device), mask.to(device)


def pack(ids, mask):
    lengths = mask.sum(1)
    flat = ids[mask.bool()]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return flat, cu, int(lengths.max())


@pytest.mark.parametrize("hf_attn", ["sdpa", "eager"])
def test_padded_batch_matches_transformers(hf_attn):
    ours, theirs = make_pair(hf_attn=hf_attn)
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask).logits
        hf_logits = theirs(input_ids=ids, attention_mask=mask).logits
    assert ours_logits.shape == hf_logits.shape == (len(LENGTHS), max(LENGTHS), 256)
    real = mask.bool()  # transformers' padded rows are junk by design: compare real tokens only
    assert (ours_logits[real] - hf_logits[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_packed_stream_matches_transformers_per_document_for_every_backend(device):
    backends = available_backends(device)
    assert "sdpa" in backends
    ids, mask = padded_batch(LENGTHS, device=device)
    flat, cu, max_len = pack(ids, mask)
    for backend in backends:
        ours, theirs = make_pair(device, attn_backend=backend)
        with torch.no_grad():
            packed_logits = ours(flat, cu, max_len).logits
            hf_logits = theirs(input_ids=ids, attention_mask=mask).logits
        # flash-attn and torch's varlen kernel compute in bf16 whatever the input dtype.
        tolerance = 3e-2 if backend in HALF_PRECISION_BACKENDS else 1e-5
        for doc, length in enumerate(LENGTHS):
            ours_doc = packed_logits[cu[doc]:cu[doc + 1]]
            diff = (ours_doc - hf_logits[doc, :length]).abs().max().item()
            assert diff <= tolerance, f"{backend}: document {doc} differs by {diff}"


def test_document_alone_equals_document_packed():
    ours, _ = make_pair()
    ids, mask = padded_batch(LENGTHS)
    flat, cu, max_len = pack(ids, mask)
    with torch.no_grad():
        packed = ours(flat, cu, max_len).logits
        for doc, length in enumerate(LENGTHS):
            alone = ours(ids[doc, :length], torch.tensor([0, length], dtype=torch.int32), length).logits
            assert (alone - packed[cu[doc]:cu[doc + 1]]).abs().max().item() <= 1e-5


def test_changing_one_document_leaves_the_others_bit_identical():
    ours, _ = make_pair()
    ids, mask = padded_batch(LENGTHS)
    flat, cu, max_len = pack(ids, mask)
    edited = flat.clone()
    target = 2
    start, end = int(cu[target]), int(cu[target + 1])
    edited[start:end] = torch.randint(5, 256, (end - start,), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(edited, flat)
    with torch.no_grad():
        before = ours(flat, cu, max_len).logits
        after = ours(edited, cu, max_len).logits
    others = torch.ones(flat.shape[0], dtype=torch.bool)
    others[start:end] = False
    assert torch.equal(before[others], after[others])
    assert not torch.allclose(before[~others], after[~others])


def test_changing_one_document_length_leaves_the_others_equal():
    ours, _ = make_pair()
    ids, mask = padded_batch(LENGTHS)
    flat, cu, max_len = pack(ids, mask)
    target = 1
    end = int(cu[target + 1])
    longer = torch.cat([flat[:end], torch.randint(5, 256, (11,)), flat[end:]])
    new_lengths = torch.tensor(LENGTHS)
    new_lengths[target] += 11
    new_cu = torch.nn.functional.pad(new_lengths.cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        before = ours(flat, cu, max_len).logits
        after = ours(longer, new_cu, int(new_lengths.max())).logits
    for doc in range(len(LENGTHS)):
        if doc == target:
            continue
        diff = (before[cu[doc]:cu[doc + 1]] - after[new_cu[doc]:new_cu[doc + 1]]).abs().max().item()
        assert diff <= 1e-6, f"document {doc} moved by {diff}"


def test_loss_and_gradients_on_packed_stream_match_transformers():
    ours, theirs = make_pair()
    ids, mask = padded_batch(LENGTHS)
    g = torch.Generator().manual_seed(3)
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    flat, cu, max_len = pack(ids, mask)
    flat_labels = labels[mask.bool()]

    ours_out = ours(flat, cu, max_len, labels=flat_labels)
    ours_out.loss.backward()
    hf_out = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    hf_out.loss.backward()

    assert ours_out.logits.shape[0] == int((flat_labels != -100).sum()) == int(ours_out.num_masked)
    assert abs(ours_out.loss.item() - hf_out.loss.item()) <= 1e-4 * abs(hf_out.loss.item())
    hf_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        ref = hf_grads[name].grad
        rel = ((param.grad - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, f"{name}: relative gradient error {rel}"


def test_sparse_head_logits_equal_full_head_rows():
    ours, _ = make_pair()
    ids, mask = padded_batch(LENGTHS)
    flat, cu, max_len = pack(ids, mask)
    labels = torch.full_like(flat, -100)
    labels[::4] = flat[::4]
    with torch.no_grad():
        sparse = ours(flat, cu, max_len, labels=labels).logits
        full = ours(flat, cu, max_len).logits
    assert sparse.shape == (int((labels != -100).sum()), 256)
    assert (sparse - full[labels != -100]).abs().max().item() <= 1e-6


def test_num_masked_hint_gives_the_same_loss_and_gradients():
    ours, _ = make_pair()
    ids, mask = padded_batch(LENGTHS)
    flat, cu, max_len = pack(ids, mask)
    labels = torch.full_like(flat, -100)
    labels[1::3] = flat[1::3]
    plain = ours(flat, cu, max_len, labels=labels)
    plain.loss.backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    hinted = ours(flat, cu, max_len, labels=labels, num_masked=int((labels != -100).sum()))
    hinted.loss.backward()
    assert torch.equal(plain.loss, hinted.loss)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, ours.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs a CUDA device")
def test_training_step_has_no_host_sync_on_gpu():
    for backend in available_backends("cuda"):
        ours, _ = make_pair("cuda", attn_backend=backend)
        ids, mask = padded_batch(LENGTHS, device="cuda")
        flat, cu, max_len = pack(ids, mask)
        labels = torch.where(flat % 3 == 0, flat, torch.full_like(flat, -100))
        num_masked = int((labels != -100).sum())
        ours.train()
        ours(flat, cu, max_len, labels=labels, num_masked=num_masked).loss.backward()  # warm caches/compiles
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = ours(flat, cu, max_len, labels=labels, num_masked=num_masked).loss
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
