"""Model registry over the object store (a local folder or an ``s3://`` prefix; MinIO in production).

Layout under the registry root::

    <model_name>/versions/<version>/          immutable: policy weights + config, feature spec,
                                              TorchScript export, evaluation report, blessing,
                                              lineage.json; _MANIFEST.json written last
    <model_name>/versions/vNNNN.claim         the version number, taken with a conditional create
    <model_name>/aliases/production.json      {version, content_hash, when, why, previous_version}
    <model_name>/aliases/history/<seq>.json   every alias move, appended with conditional creates

    <model_name>/versions/<hash>.lock         held while that content is being registered

Write order makes crashes harmless: a version is visible only once its manifest exists, and the
alias moves (compare-and-swap on its ETag) only after the version is complete. Registering content
that is already registered returns the existing version, also when two registrations of the same
content race: the content's lock (a conditional create) lets one register it while the other waits
and then finds that version. A lock whose holder died is taken over (compare-and-swap) once its
process is gone from this host or the lock is older than ``LOCK_LEASE_S``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from grade import __version__
from grade.core import store
from grade.core.config import DEFAULT_MODEL
from grade.core.errors import InputError
from grade.core.store import paths

log = logging.getLogger("grade.model.registry")

ALIAS = "production"
LINEAGE_FILE = "lineage.json"
#: a registration lock older than this is taken over (its holder is presumed dead on another host)
LOCK_LEASE_S = 600.0
#: how often a registration waiting for the same content's lock looks again
LOCK_POLL_S = 0.25


class AliasConflict(Exception):
    """The alias moved between reading it and writing it: another promotion won the race."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def code_version() -> str:
    """The package version plus the git commit when the code runs from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


class Registry:
    def __init__(self, root: str, model_name: str = DEFAULT_MODEL):
        self.root = str(root)
        self.model_name = paths.safe_name(model_name, "model name")
        self.model_root = store.join(self.root, model_name)
        self.versions_root = store.join(self.model_root, "versions")
        self.alias_uri = store.join(self.model_root, "aliases", f"{ALIAS}.json")
        self.history_root = store.join(self.model_root, "aliases", "history")

    # -- versions ----------------------------------------------------------------------------

    def version_uri(self, version: str) -> str:
        return store.join(self.versions_root, paths.safe_name(version, f"{self.versions_root}: version"))

    def versions(self) -> list[str]:
        """Published versions (a manifest exists), oldest first; listed names that break the path rule
        are not versions."""
        names = store.list_prefix(self.versions_root)
        return sorted(n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/" + store.MANIFEST)
                      and paths.path_problem(n) is None)

    def check_exists(self) -> None:
        """InputError unless the registry's root exists: a local folder, or an S3 bucket (S3 prefixes
        are not folders: a new registry on an existing bucket exists)."""
        if not store.folder_exists(self.root):
            where = "bucket" if store.is_s3(self.root) else "folder"
            raise InputError(f"--registry {self.root}: no such {where}; nothing is registered there "
                             "(a typo? a new local registry is made with --create-registry)")

    def check_usable(self, create: bool = False) -> None:
        """Before the first registration or alias move: the root exists (made when ``create``, locally)
        and can be written; InputError (exit 2) otherwise, with nothing changed."""
        local = store.backend_for(self.root).local_path(self.root)
        if create and local is not None:
            store.check_writable(self.root)
            local.mkdir(parents=True, exist_ok=True)
        self.check_exists()
        store.check_writable(self.root)

    def lineage(self, version: str) -> dict[str, Any]:
        """The version's lineage.json, checked against the version's manifest."""
        uri = self.version_uri(version)
        return paths.loads(store.read_published_file(uri, LINEAGE_FILE), store.join(uri, LINEAGE_FILE))

    def find_by_hash(self, content_hash: str) -> str | None:
        for v in self.versions():
            if self.lineage(v).get("content_hash") == content_hash:
                return v
        return None

    def _claim_version(self, content_hash: str) -> str:
        """A fresh version id ``vNNNN-<hash8>``; the sequence number is claimed with a conditional create,
        so concurrent writers never share a number (and ids sort in registration order)."""
        claims = [n for n in store.list_prefix(self.versions_root) if n.endswith(".claim") and "/" not in n]
        seq = len(claims) + 1
        while True:
            version = f"v{seq:04d}-{content_hash[:8]}"
            try:
                store.put_if_absent(store.join(self.versions_root, f"v{seq:04d}.claim"),
                                    json.dumps({"version": version, "claimed": _now()}).encode())
                return version
            except store.PreconditionFailed:
                seq += 1

    def register(self, model_uri: str, *, report_uri: str | None = None, data_uri: str | None = None,
                 parent: str | None = None, extra_files: dict[str, bytes] | None = None) -> tuple[str, bool]:
        """Register the published model folder at ``model_uri``; returns (version, newly_created).

        The version holds the model's files as evaluated (its content hash is recorded), a TorchScript
        export of the serving policy, the evaluation report files and ``extra_files``. The model is
        checked against its manifest before a version number is taken.
        """
        content_hash = store.content_hash(model_uri)
        existing = self._lock_content(content_hash)
        if existing:
            log.info("registry: %s is already version %s", model_uri, existing)
            return existing, False
        try:
            with store.fetched(model_uri) as local:
                version = self._claim_version(content_hash)
                lineage = {"version": version, "model_name": self.model_name, "content_hash": content_hash,
                           "source_uri": model_uri, "data_uri": data_uri, "report_uri": report_uri,
                           "parent_version": parent, "code_version": code_version(), "registered": _now()}
                self._publish_version(model_uri, local, lineage, report_uri, extra_files or {})
        finally:
            store.delete(self._lock_uri(content_hash))
        log.info("registry: registered %s as %s/%s", model_uri, self.model_name, version)
        return version, True

    def _publish_version(self, model_uri: str, local: Path, lineage: dict[str, Any], report_uri: str | None,
                         extra_files: dict[str, bytes]) -> None:
        """Stage the version folder (the model as evaluated in ``local``, its export, report, extras)
        and publish it."""
        with store.temp_folder("register") as staging:
            manifest = store.read_manifest(model_uri)
            for rel, meta in manifest["files"].items():
                data = (local / rel).read_bytes()
                # hashed as copied: the bytes registered are the bytes the manifest (and the report) name
                if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                    raise store.IntegrityError(f"{store.join(model_uri, rel)}: content differs from the "
                                               "manifest (sha256 mismatch) while it was registered")
                dst = staging / "model" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
            # the model's own manifest travels along: the copy is a published folder with the same hash
            (staging / "model" / store.MANIFEST).write_text(
                json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            try:
                from grade.model.policy import TORCHSCRIPT_FILE, export_torchscript, load_policy

                export_torchscript(load_policy(str(staging / "model")), staging / TORCHSCRIPT_FILE)
            except Exception as e:  # a folder without a policy can still be versioned
                log.warning("registry: no TorchScript export for %s: %s", model_uri, e)
            if report_uri:
                folder = report_uri.rsplit("/", 1)[0] if report_uri.endswith(".json") else report_uri
                listed = store.read_manifest(folder)["files"]
                for name in ("report.json", "report.html"):
                    if name in listed:  # checked against the report's manifest as it is read
                        (staging / name).write_bytes(store.read_published_file(folder, name))
            for name, data in extra_files.items():
                (staging / name).write_bytes(data)
            (staging / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
            store.publish_dir(staging, self.version_uri(lineage["version"]),
                              extra={"version": lineage["version"]})

    # -- one registration per content ----------------------------------------------------------

    def _lock_uri(self, content_hash: str) -> str:
        return store.join(self.versions_root, f"{content_hash}.lock")

    def _lock_content(self, content_hash: str) -> str | None:
        """The version already holding ``content_hash``, or None once this process holds its lock
        (the caller deletes it). Waits while another registration of the same content runs."""
        existing = self.find_by_hash(content_hash)
        if existing:
            return existing
        lock = self._lock_uri(content_hash)
        while not self._try_lock(lock):
            time.sleep(LOCK_POLL_S)
        existing = self.find_by_hash(content_hash)  # registered by the holder we waited for
        if existing:
            store.delete(lock)
        return existing

    def _try_lock(self, lock: str) -> bool:
        """Create the lock, or take it over from a dead holder; False while a live one holds it."""
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        try:
            store.put_if_absent(lock, mine)
            return True
        except store.PreconditionFailed:
            pass
        try:
            data, etag = store.get_with_etag(lock)
        except store.NotFound:
            return False  # released meanwhile: the next look finds the version or takes the lock
        holder = paths.loads(data, lock)
        gone = holder.get("host") == socket.gethostname() and not store.process_alive(int(holder["pid"]))
        if not gone and time.time() - float(holder["since"]) < LOCK_LEASE_S:
            return False
        try:
            store.put_if_match(lock, mine, etag)
        except store.PreconditionFailed:
            return False  # another waiter took it over first
        log.warning("registry: took over %s from %s (process %s)", lock, holder.get("host"),
                    holder.get("pid"))
        return True

    def model_uri(self, version: str) -> str:
        """The model folder (as evaluated) inside a version."""
        return store.join(self.version_uri(version), "model")

    # -- the alias -----------------------------------------------------------------------------

    def production(self) -> tuple[dict[str, Any], str] | None:
        """(alias record, its ETag) or None when nothing is in production."""
        try:
            data, etag = store.get_with_etag(self.alias_uri)
        except store.NotFound:
            return None
        record = paths.loads(data, self.alias_uri)
        if not isinstance(record, dict):
            raise InputError(f"{self.alias_uri}: expected a JSON object (the alias record)")
        paths.safe_name(record.get("version"), f"{self.alias_uri}: version")
        return record, etag

    def set_production(self, version: str, why: str, *, expected_etag: str | None,
                       action: str = "promote") -> dict[str, Any]:
        """Move the alias to ``version`` by compare-and-swap; :class:`AliasConflict` if it moved meanwhile.

        ``expected_etag`` is the ETag read before deciding (None: there was no alias).
        """
        if version not in self.versions():
            raise ValueError(f"version {version} is not a published version of {self.model_name}")
        current = self.production()
        previous = current[0]["version"] if current else None
        record = {"version": version, "content_hash": self.lineage(version)["content_hash"], "when": _now(),
                  "why": why, "previous_version": previous, "action": action}
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        try:
            if expected_etag is None:
                store.put_if_absent(self.alias_uri, data)
            else:
                store.put_if_match(self.alias_uri, data, expected_etag)
        except store.PreconditionFailed as e:
            raise AliasConflict(f"{self.alias_uri}: the production alias moved concurrently ({e})") from None
        self._append_history(record)
        log.info("registry: %s/%s -> %s (%s)", self.model_name, ALIAS, version, why)
        return record

    def rollback_target(self) -> str | None:
        """The version that served before the current one, undoing earlier rollbacks too.

        Replays the history as a stack (a promotion pushes, a rollback pops), so rolling back twice
        goes two promotions back rather than toggling between the last two versions.
        """
        current = self.production()
        if current is None:
            return None
        stack: list[str] = []
        for move in self.history():
            if move.get("action") == "rollback":
                if stack:
                    stack.pop()
                if not stack or stack[-1] != move["version"]:
                    stack.append(move["version"])
            else:
                stack.append(move["version"])
        if stack and stack[-1] == current[0]["version"]:
            return stack[-2] if len(stack) > 1 else None
        return current[0].get("previous_version")  # history incomplete: trust the alias record

    def rollback(self, why: str = "rollback", to: str | None = None) -> dict[str, Any]:
        """Point the alias back at the previous version (or ``to``); recorded in the history."""
        current = self.production()
        target = to or self.rollback_target()
        if current is None or not target:
            raise ValueError(f"{self.model_name}: nothing to roll back to")
        if target == current[0]["version"]:
            raise ValueError(f"{self.model_name}: {target} is already in production")
        return self.set_production(target, why, expected_etag=current[1], action="rollback")

    def _append_history(self, record: dict[str, Any]) -> None:
        seq = len(store.list_prefix(self.history_root)) + 1
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        while True:
            try:
                store.put_if_absent(store.join(self.history_root, f"{seq:06d}.json"), data)
                return
            except store.PreconditionFailed:
                seq += 1

    def history(self) -> list[dict[str, Any]]:
        return [store.read_json(store.join(self.history_root, n))
                for n in store.list_prefix(self.history_root)]


def production_model(registry_uri: str, model_name: str = DEFAULT_MODEL) -> tuple[str, str] | None:
    """(version, model folder URI) of the production model, or None when there is none."""
    reg = Registry(registry_uri, model_name)
    current = reg.production()
    if current is None:
        return None
    version = current[0]["version"]
    return version, reg.model_uri(version)
