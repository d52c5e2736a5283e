"""Raw files -> tokenizer.json + MDS shards, for ModernBERT pretraining (CLI: `modernbert-data`).

Built on `modernbert_train` (its errors, progress, shard layout and tokenizer loading); `modernbert_train`
never imports data_prep. Contracts: docs/CONTRACTS.md.

    tokenizer.py     train_tokenizer (loading and saving: modernbert_train.data.tokenizer, contract 1)
    sources.py       input discovery, work units, readers that turn bad records into counted Problems
    prepare.py       prepare(PrepareConfig): parallel, resumable tokenize + chunk + MDS write (contract 2)
    bookkeeping.py   atomic JSON writes and the output-folder lock of prepare
    stats.py         iter_samples, folder_stats, length histograms (shard safety: modernbert_train.data.shards)
    remote.py        prepare to object storage (parts uploaded as finished, index last), remote metadata
    distributed.py   prepare on Apache Spark: one task per work unit (spark_daemon.py: its worker daemon)
    local_corpus.py  the offline demo corpus (stdlib code + Python prose; held-out rule: modernbert_train.eval.heldout)
    cli.py           `modernbert-data train-tokenizer | prepare | stats | build-local-corpus`
"""
