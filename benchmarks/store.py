"""Object-store throughput: grade.core.store vs the raw minio client, upload and download, same run.

Starts its own S3 test server (moto) on loopback unless S3_ENDPOINT_URL is set (e.g. a real MinIO).
The target is grade.core.store >= 0.8x the raw client: the retry and atomic-publish plumbing must cost
little on large objects. It also times ``open_published`` of a published folder of the same size
(4 files): locally, checking sha256 vs checking sizes only; on S3, the verified fetch (hashed while
downloading) vs the raw client downloading the same files.

    python -m benchmarks.store [--mib 256] [--repeat 6]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks._common import emit


def _server():
    if os.environ.get("S3_ENDPOINT_URL"):
        return None
    from tests.conftest import free_port, s3_environ, start_moto

    port = free_port()
    proc = start_moto(port)
    os.environ.update(s3_environ(f"http://127.0.0.1:{port}"))
    return proc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_into(src: Path, folder: Path, parts: int) -> None:
    """Cut ``src`` into ``parts`` files of ``folder`` (a published output of the same total size)."""
    folder.mkdir()
    size = src.stat().st_size
    with open(src, "rb") as f:
        for i in range(parts):
            Path(folder, f"part-{i}.bin").write_bytes(f.read(size // parts if i < parts - 1 else -1))


def _open_published_timings(store, client, bucket: str, src: Path, d: Path, repeat: int) -> dict[str, float]:
    """Median seconds of open_published on a folder as large as ``src``: the cost of checking sha256."""
    folder = d / "folder"
    _split_into(src, folder, 4)
    local_uri, s3_uri = str(d / "published"), f"s3://{bucket}/published"
    store.publish_dir(folder, local_uri)
    store.publish_dir(folder, s3_uri)
    names = sorted(store.read_manifest(s3_uri)["files"])

    def fetch_raw() -> None:
        for n in names:
            client.fget_object(bucket, f"published/{n}", str(d / "raw-fetch" / n))

    def fetch_verified() -> None:
        store.open_published(s3_uri, cache_dir=d / "fetch")

    runs = {"local_sizes_only": lambda: store.open_published(local_uri, verify=False),
            "local_sha256": lambda: store.open_published(local_uri),
            "s3_raw_minio": fetch_raw, "s3_verified": fetch_verified}
    timings: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for kind, run in runs.items():
            shutil.rmtree(d / "fetch", ignore_errors=True)  # every fetch downloads again
            shutil.rmtree(d / "raw-fetch", ignore_errors=True)
            t0 = time.perf_counter()
            run()
            timings[kind].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in timings.items()}
    out["s3_verified_vs_raw"] = out["s3_verified"] / out["s3_raw_minio"]
    store.delete_prefix(s3_uri)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="object size in MiB")
    p.add_argument("--repeat", type=int, default=6, help="timed transfers of each kind (median reported)")
    args = p.parse_args()
    proc = _server()
    try:
        from minio import Minio

        from grade.core import store

        store.reset_s3_client()
        backend = store._s3()
        # the reference: a plain minio client with its own defaults, not grade's configured one
        client = Minio(backend.host, access_key=os.environ["AWS_ACCESS_KEY_ID"],
                       secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], secure=backend.secure,
                       region=backend.region)
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        client.make_bucket(bucket)
        with tempfile.TemporaryDirectory() as d:
            src = Path(d, "src.bin")
            with open(src, "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1 << 20))
            size_mib = src.stat().st_size / (1 << 20)
            timings: dict[str, list[float]] = {
                k: [] for k in ("store_up", "raw_up", "store_down", "raw_down")}
            raw_dst, store_dst = Path(d, "raw.bin"), Path(d, "st.bin")
            transfers = {  # one key per side, overwritten each round: the server's memory stays bounded
                "raw_up": lambda: client.fput_object(bucket, "raw", str(src), part_size=16 << 20),
                "store_up": lambda: store.upload_file(src, f"s3://{bucket}/store"),
                "raw_down": lambda: client.fget_object(bucket, "raw", str(raw_dst)),
                "store_down": lambda: store.download_file(f"s3://{bucket}/store", store_dst),
            }
            for i in range(args.repeat):
                # alternate who goes first: writeback of the previous 256 MiB otherwise penalises
                # whichever side always runs second
                order = ["raw_up", "store_up", "raw_down", "store_down"]
                if i % 2:
                    order = ["store_up", "raw_up", "store_down", "raw_down"]
                for kind in order:
                    if kind.endswith("down"):  # both sides write a new file, none replaces an old one
                        (raw_dst if kind == "raw_down" else store_dst).unlink(missing_ok=True)
                    t0 = time.perf_counter()
                    transfers[kind]()
                    timings[kind].append(time.perf_counter() - t0)
            for got in ("st.bin", "raw.bin"):
                assert _sha256(Path(d, got)) == _sha256(src), f"{got} differs from what was uploaded"
            for key in ("raw", "store"):  # the server holds the objects in memory
                client.remove_object(bucket, key)
            verify = _open_published_timings(store, client, bucket, src, Path(d), args.repeat)
        rate = {k: size_mib / statistics.median(v) for k, v in timings.items()}
        emit("store", {
            "object_mib": size_mib, "repeat": args.repeat,
            "server": "moto (loopback)" if proc else os.environ["S3_ENDPOINT_URL"],
            "upload_mib_s": {"grade_store": rate["store_up"], "raw_minio": rate["raw_up"],
                             "ratio": rate["store_up"] / rate["raw_up"]},
            "download_mib_s": {"grade_store": rate["store_down"], "raw_minio": rate["raw_down"],
                               "ratio": rate["store_down"] / rate["raw_down"]},
            "open_published_s": verify,
        })
    finally:
        if proc is not None:
            proc.terminate()


if __name__ == "__main__":
    main()
