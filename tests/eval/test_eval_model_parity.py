"""The fine-tuning models are transformers' models: same weights, same outputs."""
import torch
import transformers

from modernbert_train.eval.encoder import MeanPoolingEmbedder, PackedBatch, SequenceClassifier, TextEncoder
from modernbert_train.eval.models import load_eval_model

TEXTS = ["The for statement iterates over a sequence.", "def add(a, b): return a + b",
         "Classes provide a means of bundling data and functionality together, a longer sentence."]


def _padded(tokenizer_folder, sequences):
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask


def test_sequence_classifier_matches_transformers(hf_folder):
    model = load_eval_model(str(hf_folder))
    for pooling in ("mean", "cls"):
        ours = SequenceClassifier(model.build(0), num_labels=3, pooling=pooling).eval()
        theirs = transformers.ModernBertForSequenceClassification.from_pretrained(
            hf_folder, num_labels=3, classifier_pooling=pooling, attn_implementation="eager").eval()
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and not missing  # parameter names are transformers' own
        sequences = TextEncoder(model.tokenizer_file, 64).encode(TEXTS[:2], TEXTS[1:])
        with torch.no_grad():
            packed = ours(PackedBatch.of(sequences))
            ids, mask = _padded(hf_folder, sequences)
            padded = theirs(input_ids=ids, attention_mask=mask).logits
        assert (packed - padded).abs().max() < 1e-5, pooling


def test_embedder_matches_transformers_mean_pooling(hf_folder):
    model = load_eval_model(str(hf_folder))
    ours = MeanPoolingEmbedder(model.build(0)).eval()
    theirs = transformers.AutoModel.from_pretrained(hf_folder, attn_implementation="eager").eval()
    sequences = TextEncoder(model.tokenizer_file, 64).encode(TEXTS)
    ids, mask = _padded(hf_folder, sequences)
    with torch.no_grad():
        hidden = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        expected = torch.nn.functional.normalize(pooled, dim=-1)
        assert (ours(PackedBatch.of(sequences)) - expected).abs().max() < 1e-5
