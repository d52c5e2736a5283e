"""Mixture manifest: which shard folders make up the training data and how they are weighted.

A manifest is a YAML file (shared contract 3)::

    name: demo
    description: code and prose
    epoch_size: null              # optional: samples per epoch when mixing by proportion
    sources:
      - name: python_code         # unique
        local: demo_out/shards/code
        remote: null              # s3://, gs://, ... or a shared-filesystem path; then `local` is the
                                  # download cache, bounded by the loader's cache_limit (see dataset.py)
        proportion: 0.5           # at most one of proportion | repeat | choose
        target_tokens: 1.2e9      # documentation only
        description: "..."

Weights: `proportion` is relative (all sources must then use it) and means a share of TRAINING TOKENS: the
loader turns it into streaming's per-sample proportion with the token and chunk counts of each source's
prep_meta.json at the phase's max_seq_len (`sampling_manifest`), since a source of long chunks gives more
tokens per sample. `repeat` and `choose` are absolute, in samples, as in mosaicml-streaming (samples per epoch
= repeat * samples, or choose); none means each source once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modernbert_train.common.errors import UserError, did_you_mean

log = logging.getLogger("modernbert_train")

MANIFEST_KEYS = ("name", "description", "epoch_size", "sources")
SOURCE_KEYS = ("name", "local", "remote", "proportion", "repeat", "choose", "target_tokens", "description")
WEIGHT_KEYS = ("proportion", "repeat", "choose")
REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "dbfs:/", "sftp://",
                  "http://", "https://")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    local: str
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    target_tokens: float | None = None
    description: str = ""

    def stream_weight_kwargs(self) -> dict[str, Any]:
        """The weight argument for `streaming.Stream` (empty when the source is taken once)."""
        for key in WEIGHT_KEYS:
            value = getattr(self, key)
            if value is not None:
                return {key: value}
        return {}

    def prep_meta(self) -> dict[str, Any] | None:
        """`prep_meta.json` beside the shards (contract 2), fetched from `remote` into the cache folder when
        there is one (once per process, never trusting an older run's copy: the remote may have been
        re-prepared since); None when absent."""
        path = Path(self.local) / "prep_meta.json"
        if self.remote is not None and self.remote not in _META_FETCHED:
            _download_meta(self.remote, path, self.name)
            _META_FETCHED.add(self.remote)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from err


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    sources: list[SourceSpec]
    epoch_size: int | None = None
    path: str | None = field(default=None, compare=False)

    def source_names(self) -> list[str]:
        return [source.name for source in self.sources]


_META_FETCHED: set[str] = set()


def _download_meta(remote: str, path: Path, name: str) -> None:
    """Fetch <remote>/prep_meta.json with streaming's downloader (credentials from the environment)."""
    from streaming.base.storage.download import CloudDownloader

    url = remote.rstrip("/") + "/prep_meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.download-{os.getpid()}")  # the ranks of a node share `local`
    tmp.unlink(missing_ok=True)
    try:
        CloudDownloader.direct_download(url, str(tmp), timeout=120)
    except FileNotFoundError:
        path.unlink(missing_ok=True)  # an older copy must not stand in for a file the remote no longer has
        return
    except Exception as err:  # the clients raise their own types
        if "404" in str(err) or "Not Found" in str(err):
            path.unlink(missing_ok=True)
            return
        raise UserError(f"source {name!r}: could not read {url} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the URL, S3_ENDPOINT_URL and "
                        f"the credentials in the environment") from err
    os.replace(tmp, path)


def _number(value: Any, where: str, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError as err:
        raise UserError(f"{where}: expected a number, got {value!r}") from err
    if integer:
        if number != int(number):
            raise UserError(f"{where}: expected a whole number, got {value!r}")
        return int(number)
    return number


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r}{did_you_mean(str(key), allowed)}; "
                            f"allowed: {', '.join(allowed)}")


def _parse_source(raw: Any, index: int, where: str) -> SourceSpec:
    at = f"{where}: sources[{index}]"
    if not isinstance(raw, dict):
        raise UserError(f"{at}: expected a mapping with name/local/..., got {type(raw).__name__}")
    _check_keys(raw, SOURCE_KEYS, at)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{at}: 'name' is required (a non-empty string)")
    at = f"{where}: source {name!r}"
    local = raw.get("local")
    if not isinstance(local, str) or not local.strip():
        raise UserError(f"{at}: 'local' is required (the shard folder, or the cache folder when 'remote' is set)")
    remote = raw.get("remote")
    if remote is not None:
        if not isinstance(remote, str) or not (remote.startswith(REMOTE_SCHEMES) or os.path.isabs(remote)):
            raise UserError(f"{at}: 'remote' must be an object-store URL starting with one of "
                            f"{', '.join(REMOTE_SCHEMES)} or an absolute shared-filesystem path (got {remote!r})")
    weights = [key for key in WEIGHT_KEYS if raw.get(key) is not None]
    if len(weights) > 1:
        raise UserError(f"{at}: give at most one of proportion | repeat | choose (got {', '.join(weights)})")
    proportion = repeat = choose = None
    if raw.get("proportion") is not None:
        proportion = _number(raw["proportion"], f"{at}: proportion")
        if not proportion > 0:
            raise UserError(f"{at}: proportion must be > 0 (got {raw['proportion']!r})")
    if raw.get("repeat") is not None:
        repeat = _number(raw["repeat"], f"{at}: repeat")
        if not repeat > 0:
            raise UserError(f"{at}: repeat must be > 0 (got {raw['repeat']!r})")
    if raw.get("choose") is not None:
        choose = _number(raw["choose"], f"{at}: choose", integer=True)
        if choose <= 0:
            raise UserError(f"{at}: choose must be a positive number of samples (got {raw['choose']!r})")
    target_tokens = None
    if raw.get("target_tokens") is not None:
        target_tokens = _number(raw["target_tokens"], f"{at}: target_tokens")
        if target_tokens < 0:
            raise UserError(f"{at}: target_tokens must be >= 0 (got {raw['target_tokens']!r})")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{at}: description must be a string")
    return SourceSpec(name=name, local=os.path.expanduser(local), remote=remote, proportion=proportion,
                      repeat=repeat, choose=choose, target_tokens=target_tokens, description=description)


def parse_manifest(raw: Any, where: str = "manifest", *, check_local: bool = True) -> Manifest:
    """Validate a manifest given as a mapping (e.g. inlined in a training recipe)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with name/description/sources, got {type(raw).__name__}")
    _check_keys(raw, MANIFEST_KEYS, where)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: 'name' is required (a non-empty string)")
    raw_sources = raw.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise UserError(f"{where}: 'sources' must be a non-empty list")
    sources = [_parse_source(item, i, where) for i, item in enumerate(raw_sources)]
    seen: set[str] = set()
    for source in sources:
        if source.name in seen:
            raise UserError(f"{where}: source name {source.name!r} appears twice; names must be unique")
        seen.add(source.name)
    locals_seen: dict[str, str] = {}
    for source in sources:
        key = os.path.abspath(source.local)
        if key in locals_seen:
            raise UserError(f"{where}: sources {locals_seen[key]!r} and {source.name!r} share the folder "
                            f"{source.local}; each source needs its own")
        locals_seen[key] = source.name
    proportional = [s.proportion is not None for s in sources]
    if any(proportional) and not all(proportional):
        missing = [s.name for s in sources if s.proportion is None]
        raise UserError(f"{where}: proportions are relative, so every source needs one once any has one "
                        f"(missing in: {', '.join(missing)}); use repeat/choose for absolute weights")
    epoch_size = None
    if raw.get("epoch_size") is not None:
        epoch_size = _number(raw["epoch_size"], f"{where}: epoch_size", integer=True)
        if epoch_size <= 0:
            raise UserError(f"{where}: epoch_size must be a positive number of samples")
        if not any(proportional):
            raise UserError(f"{where}: epoch_size only applies when sources are weighted by proportion")
    if check_local:
        for source in sources:
            index = Path(source.local) / "index.json"
            if source.remote is None and not index.is_file():
                problem = "does not exist" if not Path(source.local).exists() else "has no index.json"
                raise UserError(f"{where}: source {source.name!r}: local folder {source.local} {problem} "
                                f"(expected MDS shards written by `modernbert-data prepare`; relative paths "
                                f"resolve against the current directory {os.getcwd()})")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{where}: description must be a string")
    return Manifest(name=name, description=description, sources=sources, epoch_size=epoch_size, path=where)


def load_manifest(path: str | os.PathLike, *, check_local: bool = True) -> Manifest:
    """Read and validate a mixture manifest YAML (contract 3)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from err
    return parse_manifest(raw, str(path), check_local=check_local)


def training_tokens_per_sample(meta: dict[str, Any], max_seq_len: int, where: str, resplit: str = "contiguous") -> float:
    """Mean tokens a stored chunk of this source becomes at `max_seq_len`, from prep_meta.json's `tokens`,
    `chunks` and, when present, its chunk-length histogram. A contiguous re-split keeps a chunk's tokens; a
    framed one (packing.split_sample) adds a [CLS] and a [SEP] to every piece after the first."""
    from modernbert_train.data.packing import pieces_count

    try:
        tokens, chunks = float(meta["tokens"]), int(meta["chunks"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{where}: needs numeric 'tokens' and 'chunks' to weigh the source by tokens ({err})") from err
    if chunks <= 0 or tokens <= 0:
        raise UserError(f"{where}: 'tokens' and 'chunks' must be positive (got {tokens:g}, {chunks})")
    longest = int(meta.get("max_seq_len") or 0)
    if (longest and longest <= max_seq_len) or resplit == "contiguous":
        return tokens / chunks
    histogram = (meta.get("length_histograms") or {}).get("chunk_tokens")
    if histogram:
        # Bin b holds lengths in (b/2, b]: take 3b/4, scaled so that the bins add up to the source's tokens.
        bins = [(int(b), int(n)) for b, n in histogram.items() if int(n) > 0]
        scale = tokens / max(1.0, sum(0.75 * b * n for b, n in bins))
        pieces = sum(n * pieces_count(max(1, round(0.75 * b * scale)), max_seq_len, resplit) for b, n in bins)
        pieces *= chunks / max(1, sum(n for _, n in bins))
    else:
        pieces = max(chunks, (tokens - 2 * chunks) / (max_seq_len - 2))
    return (tokens + 2 * (pieces - chunks)) / chunks


def sampling_manifest(manifest: Manifest, max_seq_len: int,
                      resplit: str = "contiguous") -> tuple[Manifest, dict[str, float] | None]:
    """The manifest with token-share proportions turned into streaming's per-sample proportions.

    Returns (manifest for streaming, wanted token share per source), or (manifest, None) when sources are not
    weighted by proportion. A source whose prep_meta.json is missing is a UserError: without its token
    counts its share of tokens cannot be honoured.
    """
    if not manifest.sources or manifest.sources[0].proportion is None:
        return manifest, None
    total = sum(float(source.proportion) for source in manifest.sources)
    shares = {source.name: float(source.proportion) / total for source in manifest.sources}
    sources = []
    for source in manifest.sources:
        meta = source.prep_meta()
        if meta is None:
            raise UserError(f"manifest {manifest.path}: source {source.name!r} has no "
                            f"{source.remote or source.local}/prep_meta.json; "
                            f"its proportion is a share of training tokens, which needs the source's token and "
                            f"chunk counts (copy prep_meta.json from the prepared shards into {source.local})")
        per_sample = training_tokens_per_sample(meta, max_seq_len, f"{source.local}/prep_meta.json", resplit)
        sources.append(dataclasses.replace(source, proportion=shares[source.name] / per_sample))
    log.info("manifest %s: token shares %s -> sample proportions %s at max_seq_len %d", manifest.path,
             {k: round(v, 4) for k, v in shares.items()},
             {s.name: round(s.proportion / sum(x.proportion for x in sources), 4) for s in sources}, max_seq_len)
    return dataclasses.replace(manifest, sources=sources), shares
