"""Shared fixtures: a small real corpus from this machine and tokenizers trained on it / shaped like ModernBERT's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from data_prep.local_corpus import build_local_corpus
from data_prep.tokenizer import iter_training_texts, save_tokenizer, train_tokenizer
from data_prep.sources import expand_inputs

CORPUS_CAP_BYTES = 300_000  # per kind: enough real variety, small enough for a 2-core CI machine


@pytest.fixture(scope="session")
def local_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_local_corpus(out, max_bytes=CORPUS_CAP_BYTES)
    return out


@pytest.fixture(scope="session")
def trained_tokenizer_dir(local_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    files = expand_inputs([local_corpus / "code", local_corpus / "prose"])
    tok = train_tokenizer(iter_training_texts(files), vocab_size=3000, show_progress=False)
    save_tokenizer(tok, out)
    return out


def build_official_layout_tokenizer(path: Path, total_vocab: int = 50368) -> Path:
    """A byte-level tokenizer.json laid out like the official ModernBERT one: 50280 ordinary entries,
    [UNK] 50280, [CLS] 50281, [SEP] 50282, [PAD] 50283, [MASK] 50284, unused specials up to `total_vocab`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for i in range(len(vocab), 50280):
        vocab[f"filler{i}"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    tok.add_special_tokens([f"[unused{i}]" for i in range(total_vocab - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 50281), ("[SEP]", 50282)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    return [json.loads(line)[field] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def decoded_documents(folder: Path, tok: Tokenizer) -> list[str]:
    """Texts of the documents in a prepared folder, in shard order: chunks re-joined, [CLS]/[SEP] removed."""
    from data_prep.stats import iter_samples

    docs: dict[int, list] = {}
    for sample in iter_samples(folder):
        ids = sample["input_ids"].tolist()
        chunks = docs.setdefault(int(sample["doc_id"]), [])
        assert int(sample["chunk_index"]) == len(chunks), "chunks out of order"
        chunks.append(ids[1:-1])
    return [tok.decode([i for chunk in chunks for i in chunk], skip_special_tokens=False) for chunks in docs.values()]


def run_prepare(inputs, out: Path, tokenizer, **overrides) -> dict:
    from data_prep.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=[str(i) for i in inputs], out=str(out), tokenizer=str(tokenizer), progress=False,
                        **overrides)
    return prepare(cfg)


class S3Server:
    """moto's S3 server on 127.0.0.1 (a real S3-protocol endpoint), stoppable and restartable on its port.

    Objects live in moto's in-process backends, so they survive a stop/start of the HTTP server: `stop()`
    makes the endpoint refuse connections, as an object store that went away for a while.
    """

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """One S3 server per test session; credentials and endpoint in the environment, as a user sets them."""
    import logging
    import os

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "S3_ENDPOINT_URL"]}
    os.environ.update(env)
    server = S3Server()
    os.environ["S3_ENDPOINT_URL"] = server.endpoint
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
