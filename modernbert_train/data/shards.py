"""Reading prepared MDS folders safely: the index, column safety, shard hashes, samples, token-id ranges.

Every path that reads shards outside a StreamingDataset (stats, the pre-training token-range check, tools)
goes through here, so each one refuses the same things:
  * columns whose MDS encoding can run code when decoded (`pkl`): refused before any sample is decoded,
    unless the caller passes `allow_unsafe_types=True` (a user's explicit opt-in);
  * shards whose bytes do not match the hash in index.json (written by `prepare`, algorithm SHARD_HASH);
  * shards that do not decompress or decode; every such error names the shard file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from modernbert_train.common.errors import UserError

# Fast non-cryptographic hash: it detects corruption (disk, copy, truncation), not tampering (whoever can
# rewrite a shard can rewrite index.json too). streaming verifies it when it decompresses a shard.
SHARD_HASH = "xxh3_64"
INDEX_FILE = "index.json"


def confined_path(folder: str | os.PathLike, name, source: str | os.PathLike) -> Path:
    """folder / name, for a name read from a data file (`source`: an index, manifest or summary).

    The one check for every such join: the name must be a relative path of plain names ("shard.00000.mds",
    "part-00000/shard.00000.mds.zstd"). Anything that could point elsewhere ("../x", "/etc/x", "a/./b", "",
    a backslash or NUL) is a UserError naming the file and the name, before anything is read, written or
    deleted there."""
    parts = name.split("/") if isinstance(name, str) else None
    if (not parts or any(p in ("", ".", "..") for p in parts) or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise UserError(f"{source}: {name!r} is not a plain file name inside {folder} (a name with '..', '/' at "
                        f"the start or empty parts could point outside it); refusing to use it — the file is "
                        f"corrupt or was crafted")
    return Path(folder, *parts)


def shard_file_names(index: dict) -> list[str]:
    """Every file name an MDS index lists (raw and compressed data and meta files), in index order."""
    names = []
    for shard in index.get("shards", []):
        for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
            info = shard.get(key) if isinstance(shard, dict) else None
            if isinstance(info, dict) and "basename" in info:
                names.append(info["basename"])
    return names


def recognise_shard_cache(folder: Path) -> str | None:
    """The deletion guard's test for a shard cache folder: only its index.json and the files that index lists
    (with streaming's temporary variants of them: a listed name plus a suffix). None when it is, else why not."""
    try:
        listed = set(shard_file_names(json.loads((folder / INDEX_FILE).read_text())))
    except (OSError, ValueError, AttributeError):
        listed = set()
    listed_dirs = {str(Path(name).parent) for name in listed}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            return f"holds the symbolic link {relative}, which a shard cache never holds"
        if path.is_dir():
            if relative not in listed_dirs:
                return f"holds the folder {relative}, which its index.json does not list"
        elif relative != INDEX_FILE and not any(relative.startswith(name) for name in listed):
            return f"holds {relative}, which its index.json does not list"
    return None


def remove_shard_cache(folder: str | os.PathLike) -> bool:
    """Delete one shard cache folder of ours through the deletion guard; a folder that holds anything else is
    kept, with a warning naming it (this runs at exit and between attempts: it never raises)."""
    import logging

    from modernbert_train.common.safety import remove_tree

    try:
        return remove_tree(folder, label="shard cache folder", recognise=recognise_shard_cache)
    except (UserError, OSError) as err:
        logging.getLogger("modernbert_train").warning("kept %s: %s", folder, err)
        return False


def read_json_file(path: str | os.PathLike, what: str = "") -> dict:
    """json.loads of a bookkeeping file; a truncated or corrupt one is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                        f"the file is truncated or corrupt{what}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text file ({err.reason}){what}") from None


def load_index(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        hint = " (prepare did not finish: re-run it to resume)" if (folder / "plan.json").is_file() else ""
        raise UserError(f"{folder} has no {INDEX_FILE}{hint}")
    index = read_json_file(index_file, " (re-run `modernbert-data prepare` on the same --out to rewrite it)")
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise UserError(f"{index_file}: not an MDS index (no 'shards' list)")
    for name in shard_file_names(index):
        confined_path(folder, name, index_file)
    return index


def unsafe_columns(index: dict) -> list[tuple[str, str]]:
    """(column, encoding) pairs of any shard whose decoding may execute code (streaming's own list)."""
    from streaming.base.format.mds.encodings import is_mds_encoding_safe

    found: dict[str, str] = {}
    for shard in index["shards"]:
        for name, encoding in zip(shard.get("column_names", []), shard.get("column_encodings", [])):
            if not is_mds_encoding_safe(encoding):
                found.setdefault(name, encoding)
    return sorted(found.items())


def check_column_safety(folder: str | os.PathLike, index: dict, allow_unsafe_types: bool = False) -> None:
    unsafe = unsafe_columns(index)
    if unsafe and not allow_unsafe_types:
        cols = ", ".join(f"{name} ({encoding})" for name, encoding in unsafe)
        raise UserError(f"{Path(folder) / INDEX_FILE}: column {cols} is a pickle, and decoding it can run "
                        f"arbitrary code; `prepare` never writes one. Read it only if you trust whoever wrote "
                        f"these shards (stats: --allow-unsafe-types)")


def _verify(path: Path, data: bytes, info: dict) -> None:
    from streaming.base.hashing import get_hash

    if info.get("bytes") is not None and len(data) != info["bytes"]:
        raise UserError(f"shard {path} is corrupt: {len(data):,} bytes, index.json says {info['bytes']:,}")
    expected = (info.get("hashes") or {}).get(SHARD_HASH)
    if expected is not None and get_hash(SHARD_HASH, data) != expected:
        raise UserError(f"shard {path} is corrupt: its {SHARD_HASH} hash does not match index.json "
                        f"(restore it from the original, or re-run prepare)")


def shard_bytes(folder: Path, shard: dict, verify: bool = True) -> bytes:
    """Uncompressed bytes of one shard, verified against index.json: the raw file if present, else unzipped."""
    raw_info = shard["raw_data"]
    raw = confined_path(folder, raw_info["basename"], folder / INDEX_FILE)
    if raw.is_file():
        data = raw.read_bytes()
        if verify:
            _verify(raw, data, raw_info)
        return data
    zip_info = shard.get("zip_data")
    if not zip_info:
        raise UserError(f"shard {raw} is missing")
    zipped = confined_path(folder, zip_info["basename"], folder / INDEX_FILE)
    if not zipped.is_file():
        raise UserError(f"shard {zipped} is missing")
    packed = zipped.read_bytes()
    if verify:
        _verify(zipped, packed, zip_info)
    compression = shard.get("compression") or ""
    try:
        if compression.startswith("zstd"):
            import zstandard

            data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=raw_info["bytes"])
        else:
            from streaming.base.compression import decompress

            data = decompress(compression, packed)
    except Exception as err:  # noqa: BLE001 - any codec error means the same thing: a corrupt shard
        raise UserError(f"shard {zipped} is corrupt: cannot decompress ({type(err).__name__}: {err})") from None
    if verify:
        _verify(zipped, data, dict(raw_info, hashes={}))
    return data


def check_stream_shard_names(dataset) -> None:
    """Every shard name a built StreamingDataset read from its sources' index.json (a remote one's included,
    which streaming fetched itself) confined to the stream's local folder, before streaming downloads,
    decompresses or deletes anything by those names."""
    for shard_id, shard in enumerate(dataset.shards):
        stream = dataset.streams[int(dataset.stream_per_shard[shard_id])]
        folder = Path(stream.local, stream.split or "")
        for pair in shard.file_pairs:
            for info in pair:
                if info is not None:
                    confined_path(folder, info.basename, f"{stream.remote or stream.local}/{INDEX_FILE}")


def iter_shard_samples(folder: Path, shard: dict, limit: int | None = None) -> Iterator[dict]:
    """Decoded samples of one shard (column safety must have been checked on the whole index)."""
    from streaming.base.format import reader_from_json

    data = shard_bytes(folder, shard)
    name = confined_path(folder, (shard.get("zip_data") or shard["raw_data"])["basename"], folder / INDEX_FILE)
    try:
        reader = reader_from_json(str(folder), None, shard)
        n = shard["samples"]
        offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"shard {name} is corrupt: cannot read its header ({type(err).__name__}: {err})") from None
    for i in range(n if limit is None else min(n, limit)):
        try:
            sample = reader.decode_sample(data[offsets[i]:offsets[i + 1]])
        except Exception as err:  # noqa: BLE001
            raise UserError(f"shard {name} is corrupt: sample {i} does not decode "
                            f"({type(err).__name__}: {err})") from None
        yield sample


def iter_samples(folder: str | os.PathLike, progress: bool = False, allow_unsafe_types: bool = False) -> Iterator[dict]:
    """Every sample of an MDS folder in index order, as streaming decodes it, hashes verified."""
    from modernbert_train.common.progress import track

    folder = Path(folder)
    index = load_index(folder)
    check_column_safety(folder, index, allow_unsafe_types)
    for shard in track(index["shards"], f"scan {folder}", unit="shard", mode=None if progress else "none"):
        yield from iter_shard_samples(folder, shard)


def has_shard_hashes(folder: str | os.PathLike) -> bool:
    """Whether every compressed shard of a local folder carries SHARD_HASH (prepared by this version)."""
    index = load_index(folder)
    infos = [s.get("zip_data") or s.get("raw_data") or {} for s in index["shards"]]
    return bool(infos) and all(SHARD_HASH in (info.get("hashes") or {}) for info in infos)


def scan_token_range(folder: str | os.PathLike, max_shards: int = 4, max_samples_per_shard: int = 2000) -> int:
    """Largest token id in a sample of a folder's shards: the first, the last and evenly spaced ones between."""
    folder = Path(folder)
    index = load_index(folder)
    check_column_safety(folder, index)
    shards = index["shards"]
    if not shards:
        return -1
    encodings = dict(zip(shards[0].get("column_names", []), shards[0].get("column_encodings", [])))
    if not str(encodings.get("input_ids", "")).startswith("ndarray"):
        raise UserError(f"{folder / INDEX_FILE}: no input_ids ndarray column (columns: "
                        f"{', '.join(encodings) or 'none'}); not shards written by `modernbert-data prepare`")
    picks = sorted({round(i * (len(shards) - 1) / max(1, max_shards - 1)) for i in range(max_shards)})
    largest = -1
    for pick in picks:
        for sample in iter_shard_samples(folder, shards[pick], max_samples_per_shard):
            ids = sample["input_ids"]
            if ids.size:
                largest = max(largest, int(ids.max()))
    return largest


def check_token_ranges(manifest, vocab_size: int, where: str = "") -> None:
    """Refuse, before training, any source whose token ids do not fit the vocabulary (one line naming it).

    A source with prep_meta.json is checked by its recorded vocab_size (the tokenizer match is checked by the
    caller); one without is checked by scanning a sample of its shards. A remote source whose index is not
    cached yet cannot be scanned before streaming downloads it, and is left to the loader's own check.
    """
    for source in manifest.sources:
        meta = source.prep_meta()
        if meta is not None:
            recorded = meta.get("vocab_size")
            if not isinstance(recorded, int) or recorded > vocab_size:
                raise UserError(f"{where}source {source.name!r}: {source.local}/prep_meta.json says vocab_size "
                                f"{recorded!r}, but the model's tokenizer has {vocab_size} ids")
            continue
        if not (Path(source.local) / INDEX_FILE).is_file():
            continue
        largest = scan_token_range(source.local)
        if largest >= vocab_size:
            raise UserError(f"{where}source {source.name!r}: shards in {source.local} hold token id {largest}, "
                            f"outside the tokenizer's {vocab_size} ids (prepared with another tokenizer?); "
                            f"re-prepare it with `modernbert-data prepare --tokenizer ...`")
