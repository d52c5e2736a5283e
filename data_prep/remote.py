"""Prepared sources in object storage: `prepare --out s3://...`, and reading their metadata back.

Uploads and downloads go through mosaicml-streaming's own storage code (`streaming.base.storage`), so every
remote streaming reads (s3://, gs://, oci://, azure://, hf://, dbfs:/, or a shared filesystem path) is a
remote `prepare` can write. Credentials come only from each client's usual environment variables and
profiles (AWS_ACCESS_KEY_ID / AWS_PROFILE / S3_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...).

Protocol of a remote output (what makes an interrupted upload safe to resume and to read):
    plan.json                      uploaded when a run starts
    part-00000/shard.*.mds.zstd    a finished work unit's shards, then its index.json, then
    part-00000/unit_summary.json   uploaded LAST: its presence marks the part complete
    prep_meta.json, prep_summary.json, then
    index.json                     uploaded last of all: readers see a complete source or no index at all
A run that has work to do first withdraws a stale remote index.json (deleting it only if it exists, so every
scheme works; deleting is implemented for s3 and gs, elsewhere a stale index stops the run with one line).
Where streaming's client cannot list objects (azure, hf, dbfs), the protocol's objects are probed one by one.
Locally, `--staging` holds the parts
being written; once a part is uploaded its shards are deleted there (its two small JSON files stay, so the
merged index can be written without downloading anything).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
from pathlib import Path

from data_prep.bookkeeping import (INDEX_FILE, LOCK_FILE, META_FILE, PART_PREFIX, PLAN_FILE, SUMMARY_FILE,
                                   UNIT_SUMMARY_FILE, is_own_entry, recognise_output, remove_own_entry)
from modernbert_train.common.errors import UserError
from modernbert_train.common.safety import check_safe_to_replace, remove_tree
from modernbert_train.data.shards import confined_path, read_json_file

# streaming's uploader retries each file this many times with exponential backoff (1, 2, 4, 8 s ...).
UPLOAD_RETRY = 5
DOWNLOAD_TIMEOUT = 120.0
DELETABLE_SCHEMES = ("s3", "gs", "")  # where streaming's uploader exposes a client we delete with


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for an object-store URL (s3://, gs://, ...) that streaming can read and write."""
    if path is None:
        return False
    from streaming.base.storage.upload import UPLOADERS

    scheme = urllib.parse.urlparse(str(path)).scheme
    return bool(scheme) and len(scheme) > 1 and (scheme in UPLOADERS or str(path).startswith("dbfs:/"))


def join(remote: str, *names: str) -> str:
    return "/".join([remote.rstrip("/"), *names])


def default_staging(remote: str) -> Path:
    """Where `prepare` writes parts of `remote` before uploading them (stable, so a re-run resumes)."""
    url = urllib.parse.urlparse(remote)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modernbert-data" / "staging"
    return base / url.scheme / url.netloc / url.path.strip("/")


def _explain(err: BaseException, remote: str, what: str) -> UserError:
    return UserError(f"{remote}: {what} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                     f"; check the URL, S3_ENDPOINT_URL and the credentials in the environment")


def download(remote_file: str, local_file: Path, timeout: float = DOWNLOAD_TIMEOUT) -> bool:
    """Fetch one object (replacing `local_file`); False when it does not exist."""
    from streaming.base.storage.download import CloudDownloader

    local_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_file.with_name(local_file.name + ".download")
    tmp.unlink(missing_ok=True)
    try:
        CloudDownloader.direct_download(remote_file, str(tmp), timeout)
    except FileNotFoundError:
        return False
    except Exception as err:  # each client raises its own types; "not found" is the one we expect
        text = str(err)
        if "404" in text or "Not Found" in text or "NoSuchKey" in text or "does not exist" in text:
            return False
        raise _explain(err, remote_file, "download") from err
    os.replace(tmp, local_file)
    return True


def fetch_metadata(remote: str, dest: Path, with_shards: bool = False) -> Path:
    """Download a prepared source's index.json, prep_meta.json, prep_summary.json (and shards) into `dest`."""
    if not download(join(remote, INDEX_FILE), dest / INDEX_FILE):
        hint = " (prepare did not finish: re-run it to resume)" if download(join(remote, PLAN_FILE),
                                                                              dest / PLAN_FILE) else ""
        raise UserError(f"{remote} has no index.json{hint}")
    if not download(join(remote, META_FILE), dest / META_FILE):
        raise UserError(f"{remote} has no prep_meta.json (not written by `modernbert-data prepare`)")
    download(join(remote, SUMMARY_FILE), dest / SUMMARY_FILE)
    if with_shards:
        for shard in json.loads((dest / INDEX_FILE).read_text())["shards"]:
            name = (shard.get("zip_data") or shard["raw_data"])["basename"]
            if not download(join(remote, name), confined_path(dest, name, join(remote, INDEX_FILE))):
                raise UserError(f"{remote}: shard {name} listed in index.json is missing")
    return dest


class RemoteOutput:
    """Mirror of a local staging folder in object storage, written part by part (see the module docstring)."""

    def __init__(self, remote: str, staging: Path):
        from streaming.base.storage.upload import CloudUploader

        self.remote, self.staging = remote.rstrip("/"), Path(staging)
        self.remote_names: set[str] | None = None  # what sync_down() found remotely
        self.staging.mkdir(parents=True, exist_ok=True)
        # The staging folder holds earlier parts on purpose (resume): streaming's warning about it is noise.
        upload_log = logging.getLogger("streaming.base.storage.upload")
        level = upload_log.level
        upload_log.setLevel(logging.ERROR)
        try:
            self.uploader = CloudUploader.get((str(self.staging), self.remote), keep_local=True,
                                              retry=UPLOAD_RETRY, exist_ok=True)
        except Exception as err:
            raise _explain(err, remote, "opening the bucket") from err
        finally:
            upload_log.setLevel(level)

    # -------------------------------------------------------------------------------------------- listing

    def list_names(self) -> set[str]:
        """Object names under the remote prefix, relative to it."""
        try:
            keys = self.uploader.list_objects() or []
        except NotImplementedError:  # streaming lists only s3, gs, oci, alipan and local paths
            return self._probed_names()
        except Exception as err:
            raise _explain(err, self.remote, "listing") from err
        prefix = urllib.parse.urlparse(self.remote).path.strip("/")
        names = set()
        for key in keys:
            key = str(key)
            if prefix and key.startswith(prefix + "/"):
                key = key[len(prefix) + 1:]
            names.add(key)
        return names

    def _probed_names(self) -> set[str]:
        """The protocol's objects that exist, found by downloading them: plan.json, index.json and each
        planned part's unit_summary.json (all that resuming and publishing need to know)."""
        names = set()
        with tempfile.TemporaryDirectory(prefix="modernbert-probe-") as tmp:
            for name in (PLAN_FILE, INDEX_FILE):
                if download(join(self.remote, name), Path(tmp) / name):
                    names.add(name)
            if PLAN_FILE in names:
                units = len(json.loads((Path(tmp) / PLAN_FILE).read_text())["units"])
                for index in range(units):
                    name = f"{PART_PREFIX}{index:05d}/{UNIT_SUMMARY_FILE}"
                    if download(join(self.remote, name), Path(tmp) / "probe"):
                        names.add(name)
        return names

    def completed_parts(self, names: set[str]) -> set[str]:
        return {n.split("/")[0] for n in names if n.startswith(PART_PREFIX) and n.endswith("/" + UNIT_SUMMARY_FILE)}

    # ------------------------------------------------------------------------------------------- resuming

    def sync_down(self) -> dict:
        """Bring the remote's progress into the staging folder before `prepare` reconciles it.

        Parts complete in the remote get their two JSON files locally (nothing is re-uploaded or redone);
        parts finished locally but not uploaded are uploaded now; local parts whose shards are gone and whose
        upload did not complete are removed (redone).
        """
        names = self.remote_names = self.list_names()
        done = self.completed_parts(names)
        if PLAN_FILE in names and not (self.staging / PLAN_FILE).is_file():
            download(join(self.remote, PLAN_FILE), self.staging / PLAN_FILE)
        fetched = uploaded = dropped = 0
        for part in sorted(done):
            local = confined_path(self.staging, part, f"the listing of {self.remote}")
            if not (local / UNIT_SUMMARY_FILE).is_file() or not (local / INDEX_FILE).is_file():
                remove_own_entry(local, "--staging part")
                download(join(self.remote, part, INDEX_FILE), local / INDEX_FILE)
                download(join(self.remote, part, UNIT_SUMMARY_FILE), local / UNIT_SUMMARY_FILE)
                fetched += 1
        for local in sorted(self.staging.glob(PART_PREFIX + "*")):
            if local.name in done or not (local / UNIT_SUMMARY_FILE).is_file():
                continue
            if self._has_all_shards(local):
                self.upload_part(local)
                uploaded += 1
            else:
                remove_own_entry(local, "--staging part")
                dropped += 1
        if INDEX_FILE in names:
            for name in (INDEX_FILE, META_FILE, SUMMARY_FILE):
                download(join(self.remote, name), self.staging / name)
        return {"remote_parts": len(done), "fetched": fetched, "uploaded": uploaded, "redone": dropped}

    @staticmethod
    def _shard_names(part: Path) -> list[str]:
        """The shard files a part's index.json lists (each confined to the part folder)."""
        index = part / INDEX_FILE
        if not index.is_file():
            return []
        names = [(s.get("zip_data") or s["raw_data"])["basename"] for s in read_json_file(index)["shards"]]
        for name in names:
            confined_path(part, name, index)
        return names

    @classmethod
    def _has_all_shards(cls, part: Path) -> bool:
        if not (part / INDEX_FILE).is_file():
            return False
        return all(confined_path(part, name, part / INDEX_FILE).is_file() for name in cls._shard_names(part))

    # ------------------------------------------------------------------------------------------ uploading

    def _upload(self, relative: str) -> None:
        try:
            self.uploader.upload_file(relative)
        except Exception as err:
            raise _explain(err, join(self.remote, relative), "upload") from err

    def upload_part(self, part: Path) -> None:
        """Shards, then the part's index.json, then unit_summary.json (the completion marker); then free disk."""
        shards = [p for p in sorted(part.iterdir()) if p.is_file() and p.name not in (INDEX_FILE, UNIT_SUMMARY_FILE)]
        for shard in shards:
            if not shard.is_file():  # freed by another uploader of this part, which frees shards only when done
                return
            self._upload(f"{part.name}/{shard.name}")
        self._upload(f"{part.name}/{INDEX_FILE}")
        self._upload(f"{part.name}/{UNIT_SUMMARY_FILE}")
        for shard in shards:
            shard.unlink(missing_ok=True)

    def upload_unuploaded_parts(self) -> int:
        """Upload every complete part of the staging folder whose shards are still there (not uploaded yet)."""
        count = 0
        for part in sorted(self.staging.glob(PART_PREFIX + "*")):
            if (part / UNIT_SUMMARY_FILE).is_file() and self._has_all_shards(part) and self._shard_names(part):
                self.upload_part(part)
                count += 1
        return count

    def start(self) -> None:
        """A run with work to do: the remote stops looking complete, and records the plan."""
        names = self.remote_names if self.remote_names is not None else self.list_names()
        if INDEX_FILE in names:
            self.delete([INDEX_FILE])
        self._upload(PLAN_FILE)

    def finish(self) -> None:
        self._upload(META_FILE)
        self._upload(SUMMARY_FILE)
        self._upload(INDEX_FILE)  # last: readers now see a complete source

    def delete(self, names: list[str]) -> None:
        """Remove objects (relative names). Supported where streaming exposes a client: s3, gs, local paths;
        elsewhere a UserError naming the object, before anything is deleted."""
        scheme = urllib.parse.urlparse(self.remote).scheme
        if names and scheme not in DELETABLE_SCHEMES:
            more = f" (and {len(names) - 1} more objects under {self.remote})" if len(names) > 1 else ""
            raise UserError(f"{join(self.remote, names[0])}{more} must be deleted, but deleting objects on "
                            f"{scheme}:// is not supported here; delete {'them' if more else 'it'} with your "
                            f"storage's tools and re-run (nothing was changed)")
        for name in names:
            target = join(self.remote, name)
            try:
                if scheme == "s3":
                    url = urllib.parse.urlparse(target)
                    self.uploader.s3.delete_object(Bucket=url.netloc, Key=url.path.lstrip("/"))
                elif scheme == "gs":
                    url = urllib.parse.urlparse(target)
                    client = self.uploader.gcs_client
                    if hasattr(client, "delete_object"):  # HMAC keys: streaming uses boto3's S3 API
                        client.delete_object(Bucket=url.netloc, Key=url.path.lstrip("/"))
                    else:
                        client.bucket(url.netloc).blob(url.path.lstrip("/")).delete()
                else:
                    Path(target).unlink(missing_ok=True)
            except Exception as err:
                if "404" in str(err) or "NotFound" in type(err).__name__:
                    continue
                raise _explain(err, target, "delete") from err

    def clear(self) -> None:
        """--overwrite: delete every object under the prefix (old parts must not pass for new ones), only when
        every one of them is prepare's own (the guard's rule, for a bucket prefix): nothing is deleted else."""
        names = sorted(self.list_names())
        foreign = [n for n in names if not is_own_entry(n.split("/")[0]) or n.split("/")[0] == LOCK_FILE]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise UserError(f"--out {self.remote} holds {', '.join(foreign[:3])}{more}, which prepare does not "
                            f"write; refusing --overwrite there (nothing was deleted) — choose a new prefix")
        if names and PLAN_FILE not in names:
            raise UserError(f"--out {self.remote} holds objects but no plan.json from `modernbert-data prepare`; "
                            f"refusing --overwrite there (nothing was deleted) — choose a new prefix")
        self.delete(names)


class RemoteHooks:
    """`prepare` hooks that upload each finished part at once and publish the index last."""

    def __init__(self, output: RemoteOutput):
        self.output = output

    def on_start(self) -> None:
        self.output.start()

    def on_unit_done(self, part: Path) -> None:
        self.output.upload_part(part)

    def on_finish(self) -> None:
        self.output.finish()


def prepare_remote(cfg, staging: str | os.PathLike | None = None, engine=None) -> dict:
    """`prepare` with cfg.out an object-store URL: write parts in `staging`, upload each when finished.

    engine: optional callable wrapping the upload hooks (data_prep/distributed.py's Spark engine)."""
    from data_prep.prepare import prepare

    remote = cfg.out.rstrip("/")
    staging = Path(staging) if staging else default_staging(remote)
    if cfg.overwrite:  # both places checked by the guard before anything is deleted in either
        check_safe_to_replace(staging, label="--staging", recognise=recognise_output)
    output = RemoteOutput(remote, staging)
    if cfg.overwrite:
        output.clear()
        remove_tree(staging, label="--staging", recognise=recognise_output)
        staging.mkdir(parents=True)
        output = RemoteOutput(remote, staging)
    synced = output.sync_down()
    local_cfg = type(cfg)(**{**cfg.__dict__, "out": str(staging),
                             "source": cfg.source or urllib.parse.urlparse(remote).path.rstrip("/").split("/")[-1]
                             or urllib.parse.urlparse(remote).netloc})
    hooks = RemoteHooks(output)
    try:
        summary = prepare(local_cfg, hooks=engine(hooks) if engine else hooks)
    except UserError as err:  # name the remote the user gave, not the staging folder behind it
        raise UserError(str(err).replace(f"--out {staging}", f"--out {remote}")) from None
    summary["this_run"]["remote"] = {"url": remote, "staging": str(staging), **synced}
    return summary


def remote_folder_stats(remote: str, scan: bool = False, progress: bool = False,
                        allow_unsafe_types: bool = False) -> dict:
    """`stats` of a remote source: its metadata (and for --scan its shards) fetched into a temporary folder."""
    from data_prep.stats import folder_stats

    with tempfile.TemporaryDirectory(prefix="modernbert-stats-") as tmp:
        folder = fetch_metadata(remote, Path(tmp), with_shards=scan)
        stats = folder_stats(folder, scan=scan, progress=progress, allow_unsafe_types=allow_unsafe_types)
    stats["folder"] = remote
    return stats
