"""Loader states saved by older versions: the modes they were saved with, where a newer default differs.

A state records each mode that changed what the loader reads (`sampling`, `resplit`, `packing`,
`lookahead_tokens`). A state without one predates that mode's choice and was saved with the old behaviour: the
resumed loader takes that behaviour, so that an older run continues exactly. A state that names a mode other than
the config's is refused; a lookahead the config leaves to its default is taken from the state (it is the default
that changed).
"""
from __future__ import annotations

import logging
from typing import Any

from modernbert_train.common.errors import UserError
from modernbert_train.data.config import default_lookahead_tokens
from modernbert_train.data.manifest import sampling_manifest

log = logging.getLogger("modernbert_train")

# mode -> what a state without it was saved with
BEFORE = {"sampling": "balanced", "resplit": "framed", "packing": "best_fit"}
LOOKAHEAD_ROWS_BEFORE = 64  # config.MIN_LOOKAHEAD_ROWS until 2026-12-03


def adopt_modes(loader, state: dict[str, Any]) -> None:
    """Make `loader` (built, not yet iterated) read as the run that saved `state` did."""
    mine = {"sampling": "coverage" if loader.dataset.coverage_sampling else "balanced", "resplit": loader.resplit,
            "packing": loader.packer.policy}
    for mode, before in BEFORE.items():
        saved = state.get(mode, before)
        if saved == mine[mode]:
            continue
        if mode in state:
            raise UserError(f"data config {mode} was {saved!r} in the checkpoint and is {mine[mode]!r} now; exact "
                            f"data resume needs it unchanged")
        log.info("the checkpoint's loader is from an older run, saved with %s %r: this run continues with it",
                 mode, saved)
        if mode == "sampling":
            loader.dataset.coverage_sampling = False
        elif mode == "packing":
            loader.packer.policy = saved
        else:
            _resplit_as(loader, saved)
    _adopt_lookahead(loader, state)


def _adopt_lookahead(loader, state: dict[str, Any]) -> None:
    saved = int(state.get("lookahead_tokens", default_lookahead_tokens(loader.config, LOOKAHEAD_ROWS_BEFORE)))
    if saved == loader._lookahead_tokens:
        return
    if loader.config.packing_lookahead_tokens is not None:
        raise UserError(f"data config packing_lookahead_tokens was {saved} in the checkpoint and is "
                        f"{loader.config.packing_lookahead_tokens} now; exact data resume needs it unchanged (in a "
                        f"recipe: data.loader_options.packing_lookahead_tokens={saved})")
    log.info("the checkpoint's loader buffered %d tokens ahead (this version's default: %d): this run continues "
             "with %d", saved, loader._lookahead_tokens, saved)
    loader.set_lookahead(saved)


def _resplit_as(loader, resplit: str) -> None:
    """Re-split as `resplit` from now on, with the sources' sample weights that go with it (token shares ->
    sample proportions depend on how many tokens a chunk becomes), as if the loader had been built so."""
    from streaming.base.stream import Stream
    from streaming.base.util import number_abbrev_to_int

    loader.resplit = resplit
    streaming_manifest, loader.token_shares = sampling_manifest(loader.manifest, loader.config.max_seq_len, resplit)
    if loader.token_shares is None:
        return
    dataset, epoch_size = loader.dataset, streaming_manifest.epoch_size
    for stream, source in zip(dataset.streams, streaming_manifest.sources):
        for derived in ("repeat", "choose"):  # apply_weights derives them from the proportion again
            if hasattr(stream, derived):
                delattr(stream, derived)
        stream.proportion = source.proportion
    dataset.epoch_size = Stream.apply_weights(dataset.streams, dataset.samples_per_stream,
                                              None if epoch_size is None else number_abbrev_to_int(epoch_size),
                                              dataset.shuffle_seed)
    dataset.length = -(-dataset.epoch_size // dataset._parallel_rank_world.num_ranks)
