"""Everything about checkpoint files (see DESIGN.md beside this file).

    files.py      names, the `latest` link, completeness, recovery of interrupted saves, discovery, pruning
    trust.py      the one policy for unpickling a checkpoint; sharded-folder conversion
    init.py       a run's starting point: previous run / checkpoint / HF folder / tiling, optimizer carry-over
    tiling.py     centre tiling of a smaller model's tensors (the authors' base -> large initialisation)
    averaging.py  averaging several checkpoints' weights
"""
from modernbert_train.checkpoint.files import (CHECKPOINT_NAME, LATEST_NAME, checkpoint_step, checkpoints_by_step,
                                               find_checkpoint, has_checkpoints, is_complete_checkpoint,
                                               latest_checkpoint, prune_checkpoints, recover_interrupted_save)
from modernbert_train.checkpoint.init import initial_model, load_model_weights_from_checkpoint
from modernbert_train.checkpoint.trust import convert_sharded_checkpoint, load_composer_state

__all__ = ["CHECKPOINT_NAME", "LATEST_NAME", "checkpoint_step", "checkpoints_by_step", "find_checkpoint",
           "has_checkpoints", "is_complete_checkpoint", "latest_checkpoint", "prune_checkpoints",
           "recover_interrupted_save", "initial_model", "load_model_weights_from_checkpoint",
           "convert_sharded_checkpoint", "load_composer_state"]
