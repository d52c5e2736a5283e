#!/usr/bin/env bash
# Tokenize one source of the 2T-token mixture on a Spark cluster: each of prepare's work units is one Spark
# task (retried by Spark if an executor or its Python worker dies); the driver merges the parts and uploads
# index.json last. The output equals a single-machine `modernbert-data prepare` of the same inputs.
#
#   SPARK_MASTER=spark://head:7077 EXECUTOR_CORES=64 NUM_EXECUTORS=16 \
#     launch/spark_prepare.sh /shared/raw/web --text-field text --tokenizer /shared/tok \
#       --out s3://corpus/shards/web --staging /shared/staging/web
#   DRY_RUN=1 launch/spark_prepare.sh ...      # print the spark-submit command only
#
# Needs on every node: this project installed (pip install 'modernbert-train[spark]'), Java 17+, the inputs,
# the tokenizer and --staging (or a local --out) on a filesystem all nodes see; object-store credentials in the
# environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; S3_ENDPOINT_URL for S3-compatible stores).
#
# Sizing (README "Data at scale"): one task = one core; prepare measures 0.62M tokens/s per core (bench/RESULTS.md,
# 2026-11-27), and Spark keeps ~0.9x of it per core, so 2T tokens take about
#   2e12 / (0.56e6 tok/s x cores) seconds:  1 node x 64 cores: 15.5 h;  8 x 64: 1.9 h;  16 x 64: 1.0 h;
#   32 x 64: 0.5 h (then reading the inputs, not tokenizing, is the limit).
# Units of 64 MB (the default cap) make ~30,000 tasks for 2T tokens (~4 TB of text): small enough that a lost
# executor costs minutes, large enough that Spark's per-task overhead (~0.1 s) is noise.
set -euo pipefail
source "$(dirname "$0")/common.sh"

: "${SPARK_MASTER:?set SPARK_MASTER (spark://host:7077, yarn, k8s://...)}"
EXECUTOR_CORES=${EXECUTOR_CORES:-16}
NUM_EXECUTORS=${NUM_EXECUTORS:-4}
MAX_FAILURES=${MAX_FAILURES:-4}
PYTHON=${PYTHON:-python}
CLI=$("$PYTHON" -c 'import data_prep.cli as m; print(m.__file__)')

run spark-submit --master "$SPARK_MASTER" \
  --num-executors "$NUM_EXECUTORS" --executor-cores "$EXECUTOR_CORES" \
  --conf spark.task.cpus=1 --conf spark.task.maxFailures="$MAX_FAILURES" \
  --conf spark.executorEnv.TOKENIZERS_PARALLELISM=false \
  --conf spark.pyspark.python="$PYTHON" \
  "$CLI" prepare "$@" --engine spark --spark-master active --workers "$((EXECUTOR_CORES * NUM_EXECUTORS))" \
  --no-progress
