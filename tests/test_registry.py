"""Registry on both backends: immutable versions, idempotent registration, CAS alias, rollback, crashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from grade.core import store
from grade.model.policy import TORCHSCRIPT_FILE, PolicyConfig, PolicyNet, save_policy
from grade.model.registry import AliasConflict, Registry, production_model


def model_folder(root: str, name: str, seed: int) -> str:
    """A published model folder holding a real (tiny) policy."""
    torch.manual_seed(seed)
    uri = store.join(root, "models", name)
    with store.publishing(uri) as staging:
        save_policy(PolicyNet(PolicyConfig(n_numeric=2, cat_sizes=[3], n_objectives=3)), staging)
        (staging / "metrics.json").write_text("{}\n")
    return uri


def test_register_copies_what_was_evaluated_and_is_idempotent(store_root):
    reg = Registry(store.join(store_root, "registry"))
    a = model_folder(store_root, "a", 1)
    h = store.content_hash(a)
    version, created = reg.register(a, data_uri="s3://logs@2026-11-01")
    assert created and version == f"v0001-{h[:8]}"
    assert reg.register(a) == (version, False)
    assert reg.versions() == [version]
    # the version's model folder has exactly the evaluated content, plus a loadable TorchScript export
    assert store.content_hash(reg.model_uri(version)) == h
    assert store.exists(store.join(reg.version_uri(version), TORCHSCRIPT_FILE))
    scripted = torch.jit.load(str(store.open_published(reg.version_uri(version)) / TORCHSCRIPT_FILE))
    assert scripted is not None
    lineage = reg.lineage(version)
    assert lineage["content_hash"] == h and lineage["data_uri"] == "s3://logs@2026-11-01"
    assert lineage["parent_version"] is None and lineage["code_version"]
    # registering alone never moves the alias
    assert reg.production() is None and production_model(reg.root) is None


def test_concurrent_registrations_never_share_a_version_id(store_root):
    reg = Registry(store.join(store_root, "registry"))
    folders = [model_folder(store_root, n, s) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    out: dict[int, str] = {}

    def run(i):
        out[i] = reg.register(folders[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    seqs = sorted(v.split("-")[0] for v in out.values())
    assert seqs == ["v0001", "v0002", "v0003"]
    assert sorted(reg.versions()) == sorted(out.values())


def test_alias_moves_only_by_compare_and_swap(store_root):
    reg = Registry(store.join(store_root, "registry"))
    v1, _ = reg.register(model_folder(store_root, "a", 1))
    v2, _ = reg.register(model_folder(store_root, "b", 2))
    reg.set_production(v1, "first", expected_etag=None)
    with pytest.raises(AliasConflict):  # someone else thought there was no alias yet
        reg.set_production(v2, "stale", expected_etag=None)
    record, etag = reg.production()
    assert record["version"] == v1 and record["previous_version"] is None
    reg.set_production(v2, "better", expected_etag=etag)
    with pytest.raises(AliasConflict):  # the ETag read before v2 moved in is stale now
        reg.set_production(v1, "stale", expected_etag=etag)
    record, _ = reg.production()
    assert (record["version"], record["previous_version"], record["why"]) == (v2, v1, "better")
    assert record["content_hash"] == reg.lineage(v2)["content_hash"]
    with pytest.raises(ValueError, match="not a published version"):
        reg.set_production("v0099-00000000", "nope", expected_etag=reg.production()[1])
    assert [(m["version"], m["previous_version"]) for m in reg.history()] == [(v1, None), (v2, v1)]
    assert production_model(reg.root) == (v2, reg.model_uri(v2))


def test_rollback_walks_back_through_promotions(store_root):
    reg = Registry(store.join(store_root, "registry"))
    vs = [reg.register(model_folder(store_root, n, s))[0] for n, s in (("a", 1), ("b", 2), ("c", 3))]
    for v in vs:
        current = reg.production()
        reg.set_production(v, "promote", expected_etag=current[1] if current else None)
    assert reg.rollback()["version"] == vs[1]
    assert reg.rollback()["version"] == vs[0]  # twice: two promotions back, not a toggle
    with pytest.raises(ValueError, match="nothing to roll back"):
        reg.rollback()
    assert reg.rollback(to=vs[2])["version"] == vs[2]
    assert [(m["action"], m["version"]) for m in reg.history()] == [
        ("promote", vs[0]), ("promote", vs[1]), ("promote", vs[2]),
        ("rollback", vs[1]), ("rollback", vs[0]), ("rollback", vs[2])]


_KILLED_WRITER = """
import os, sys
from grade.core import store
from grade.model.registry import Registry
reg = Registry(sys.argv[1])
real = store.write_json
def die_before_manifest(uri, obj):
    if uri.endswith(store.MANIFEST) and "/versions/" in uri:
        os._exit(9)   # killed between the version's files and its manifest
    return real(uri, obj)
store.write_json = die_before_manifest
reg.register(sys.argv[2])
"""


def killed_writer(registry: str, model: str) -> subprocess.CompletedProcess:
    """Register ``model`` in a subprocess that dies after uploading the files, before the manifest."""
    return subprocess.run([sys.executable, "-c", _KILLED_WRITER, registry, model], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def test_writer_killed_mid_upload_leaves_no_visible_version(store_root):
    registry = store.join(store_root, "registry")
    a = model_folder(store_root, "a", 1)
    proc = killed_writer(registry, a)
    assert proc.returncode == 9, proc.stderr
    reg = Registry(registry)
    uploaded = store.list_prefix(reg.versions_root)
    assert any(n.endswith("lineage.json") for n in uploaded), "the writer died after uploading files"
    assert reg.versions() == [] and reg.production() is None
    assert reg.find_by_hash(store.content_hash(a)) is None
    # a later registration takes a fresh version id and is complete
    version, created = reg.register(a)
    assert created and version.startswith("v0002-") and reg.versions() == [version]
    lineage = json.loads(store.read_bytes(store.join(reg.version_uri(version), "lineage.json")))
    assert lineage["version"] == version


def test_concurrent_registrations_of_the_same_content_make_one_version(store_root, monkeypatch):
    reg = Registry(store.join(store_root, "registry"))
    a = model_folder(store_root, "a", 1)
    # all three look for the content before any of them has registered it
    first_look, looked = threading.Barrier(3), set()
    original = Registry.find_by_hash

    def find_then_wait(self, content_hash):
        found = original(self, content_hash)
        if threading.get_ident() not in looked:
            looked.add(threading.get_ident())
            first_look.wait(timeout=30)
        return found

    monkeypatch.setattr(Registry, "find_by_hash", find_then_wait)
    out: dict[int, tuple[str, bool]] = {}

    def run(i):
        out[i] = reg.register(a)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 3 and len({v for v, _ in out.values()}) == 1, out
    assert sorted(created for _, created in out.values()) == [False, False, True]
    assert reg.versions() == [out[0][0]]


def test_a_registration_that_fails_leaves_the_content_free_to_register(store_root, monkeypatch):
    reg = Registry(store.join(store_root, "registry"))
    a = model_folder(store_root, "a", 1)
    real = store.publish_dir

    def failing(*args, **kwargs):
        raise store.StoreError("PUT failed after 5 attempt(s)")

    monkeypatch.setattr(store, "publish_dir", failing)
    with pytest.raises(store.StoreError):
        reg.register(a)
    monkeypatch.setattr(store, "publish_dir", real)
    version, created = reg.register(a)  # at once: nobody holds the content any more
    assert created and reg.versions() == [version]
