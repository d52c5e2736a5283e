"""The FLOP count's attention term equals a brute-force count of the pairs each layer's mask allows."""
import torch

from modernbert_train.model import ModernBertConfig
from modernbert_train.model.flops import attended_pairs, training_flops


def test_attended_pairs_equal_brute_force_masks():
    for length in (1, 2, 5, 64, 65, 129, 130, 300):
        for window in (None, 1, 4, 64):
            position = torch.arange(length)
            allowed = (position[:, None] - position[None, :]).abs() <= (length if window is None else window)
            assert attended_pairs(length, window) == int(allowed.sum()), (length, window)


def test_training_flops_of_a_known_config():
    config = ModernBertConfig.preset("micro")  # h 32, i 48, 5 layers (2 global), window +-4, vocab 256
    lengths, masked = [10, 3], 4
    dense = 13 * 2 * (4 * 32 * 32 + 3 * 32 * 48) * 5
    attention = 4 * 32 * ((100 + 9) * 2 + (attended_pairs(10, 4) + 9) * 3)
    head = masked * (2 * 32 * 32 + 2 * 32 * 256)
    assert training_flops(config, lengths, masked) == 3.0 * (dense + attention + head)
