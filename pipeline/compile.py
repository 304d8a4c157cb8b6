"""Compile the grade-mtf pipeline to a KFP v2 pipeline spec (YAML), deterministically.

    python -m pipeline.compile [--out pipeline.yaml] [--image IMAGE] [--gpu] [--s3-secret NAME]

The committed pipeline.yaml is this command's output with the defaults; a test recompiles and
compares byte for byte. The output only changes when the pipeline, a config default or the kfp
version changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grade.core.cli


def build_parser() -> argparse.ArgumentParser:
    from pipeline.grade_pipeline import S3_SECRET

    p = argparse.ArgumentParser(prog="python -m pipeline.compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pipeline.yaml", metavar="FILE",
                   help="where to write the pipeline spec (default: pipeline.yaml)")
    p.add_argument("--image", metavar="IMAGE",
                   help="component image, e.g. registry.example.com/grade-mtf:0.1.0 (default: $GRADE_IMAGE, "
                        "else pipeline.components.DEFAULT_IMAGE)")
    p.add_argument("--gpu", action="store_true",
                   help="request one NVIDIA GPU (nvidia.com/gpu) for each training step")
    p.add_argument("--s3-secret", default=S3_SECRET, metavar="NAME",
                   help=f"Kubernetes Secret holding S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
                        f"AWS_SECRET_ACCESS_KEY (default: {S3_SECRET})")
    return p


def compile_pipeline(out: str | Path, *, gpu: bool = False, image: str | None = None,
                     s3_secret: str | None = None) -> Path:
    """Write the compiled pipeline spec to ``out`` and return its path."""
    from kfp import compiler

    from pipeline.grade_pipeline import S3_SECRET, build_pipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline_func = build_pipeline(gpu=gpu, image=image, s3_secret=s3_secret or S3_SECRET)
    compiler.Compiler().compile(pipeline_func, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = compile_pipeline(args.out, gpu=args.gpu, image=args.image, s3_secret=args.s3_secret)
    print(f"pipeline spec: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
