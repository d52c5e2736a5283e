"""Downstream evaluation: does a pretraining run give a good encoder?

`modernbert-train eval SUITE.yaml --model M ...` fine-tunes and scores models on the tasks of a suite
(yamls/eval/): GLUE-style classification/regression, DPR-style retrieval, fixed-mask MLM. `suite` reads and
checks the suite file, `runner` runs it, `classify` / `retrieval` / `mlm` are the task kinds, `encoder` the
packed encoder with transformers' heads, `metrics` the scores, `live` the callback for evaluation during
pretraining, `local_tasks` the tasks built offline from this machine's own files.
"""
