"""ModernBERT in pure PyTorch. Importing this package needs torch alone (no composer, no streaming)."""
from modernbert_train.model.attention import available_backends
from modernbert_train.model.config import PRESETS, ModernBertConfig, pad_vocab_size
from modernbert_train.model.modeling import IGNORE_INDEX, MaskedLMOutput, ModernBertForMaskedLM, ModernBertModel

__all__ = ["ModernBertConfig", "ModernBertForMaskedLM", "ModernBertModel", "MaskedLMOutput", "PRESETS",
           "IGNORE_INDEX", "available_backends", "pad_vocab_size"]
