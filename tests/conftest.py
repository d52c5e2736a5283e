"""Test-wide settings: never touch the network, keep each run's temp files to itself."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread per process: tests often run several processes (ranks, workers) on 2 cores, and
# OpenMP threads that oversubscribe cores spin-wait each other (a tiny step went from 0.06 s to 2.7 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _release_dropped_datasets(monkeypatch):
    """Every StreamingDataset a test built gives back its threads and shared memory when the test ends, as a
    released loader does: CI's limit is 1,024 open files, and streaming holds 14+ a dataset until exit."""
    try:
        from streaming.base.dataset import StreamingDataset
    except ImportError:  # the model-only environment
        yield
        return
    import weakref

    built = []
    original_init = StreamingDataset.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append((weakref.ref(self), self._shm_prefix_int))

    monkeypatch.setattr(StreamingDataset, "__init__", recording_init)
    yield
    if built:
        from modernbert_train.data.shm_prefix import _release_blocks, release_streaming_dataset

        for ref, prefix in built:
            dataset = ref()
            if dataset is not None:
                release_streaming_dataset(dataset)
            else:  # gone; built outside data.dataset's builder, it had no finalizer to close its blocks
                _release_blocks(prefix)
