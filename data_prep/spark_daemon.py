"""Spark's Python daemon with mosaicml-streaming imported once, before it forks task workers.

`import streaming` takes seconds (it pulls in torch and transformers); pyspark's own daemon forks each Python
worker from a bare interpreter, so every worker paid it again. Set by SparkEngine as spark.python.daemon.module.
"""
import streaming  # noqa: F401 - loaded here so forked workers start with it

import data_prep.prepare  # noqa: F401
from pyspark.daemon import manager

if __name__ == "__main__":
    manager()
