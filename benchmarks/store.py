"""Object-store throughput: grade.store vs the raw minio client, upload and download, same run.

Starts its own S3 test server (moto) on loopback unless S3_ENDPOINT_URL is set (e.g. a real MinIO).
The target is grade.store >= 0.8x the raw client: the retry and atomic-publish plumbing must cost
little on large objects.

    python -m benchmarks.store [--mib 256] [--repeat 6]
"""

from __future__ import annotations

import argparse
import hashlib
import os
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="object size in MiB")
    p.add_argument("--repeat", type=int, default=6, help="timed transfers of each kind (median reported)")
    args = p.parse_args()
    proc = _server()
    try:
        from minio import Minio

        from grade import store

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
            timings: dict[str, list[float]] = {k: [] for k in ("store_up", "raw_up", "store_down", "raw_down")}
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
        rate = {k: size_mib / statistics.median(v) for k, v in timings.items()}
        emit("store", {
            "object_mib": size_mib, "repeat": args.repeat,
            "server": "moto (loopback)" if proc else os.environ["S3_ENDPOINT_URL"],
            "upload_mib_s": {"grade_store": rate["store_up"], "raw_minio": rate["raw_up"],
                             "ratio": rate["store_up"] / rate["raw_up"]},
            "download_mib_s": {"grade_store": rate["store_down"], "raw_minio": rate["raw_down"],
                               "ratio": rate["store_down"] / rate["raw_down"]},
        })
    finally:
        if proc is not None:
            proc.terminate()


if __name__ == "__main__":
    main()
