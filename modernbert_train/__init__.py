"""modernbert_train: pretrain or continue pretraining ModernBERT-style encoders.

One package per concept, lower layers first (a module imports only from its own layer or lower ones):

    common/      errors, progress and console output, the deletion guard
    model/       ModernBERT in plain PyTorch (imports torch only); transformers weight names
    data/        tokenizer loading, manifest, shards, streaming dataset, packing, masking, the loader
    checkpoint/  checkpoint files, the trust policy, initialisation (HF, previous phase, tiling), averaging
    eval/        downstream and MLM evaluation, local held-out tasks
    train/       recipe, builders, the training hub (trainer.py), callbacks, spike guard, schedule, FSDP
    run/         a run folder, its report and plots, export to Hugging Face, the demo, launcher commands
    cli/         thin argument parsing over the library (modernbert-train)

data_prep/ (modernbert-data) is built on this package, never the other way round. The numbered contracts the
docstrings cite are in docs/CONTRACTS.md.
"""
