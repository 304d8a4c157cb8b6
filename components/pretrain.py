"""Stage 1 step: LambdaLoss pretraining of the fusion policy's mean weights.

    python -m components.pretrain --features URI --out URI [--config YAML] [--epochs N] [--seed S]
                                  [--set SECTION.KEY=VALUE ...]

Reads the feature tensors written by ``components.features``; publishes the model folder
(policy.safetensors, policy.json, feature_spec.json, config.json, metrics.json, train_log.jsonl)
atomically. Re-running on the same --out resumes after the last completed epoch (checkpoints in
<out>/_checkpoints/). Exit status 2 on bad input or config.

Data-parallel on several processes (docs/distributed.md): launched by torchrun, e.g.

    torchrun --standalone --nproc-per-node 2 -m components.pretrain --features URI --out URI --threads 1

each rank streams its share of every global batch (--batch-size is the global batch); only rank 0
writes; a re-run with the same number of processes resumes.
"""

from __future__ import annotations

import argparse
import sys

import grade.core.cli
from grade.core import config, distributed
from grade.train.pretrain import pretrain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m components.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, metavar="URI",
                   help="published features folder or s3:// prefix (output of components.features)")
    p.add_argument("--out", required=True, metavar="URI",
                   help="model folder or s3:// prefix (published atomically; holds the resume checkpoints)")
    config.add_arguments(p, ("pretrain.epochs", "shared.seed", "pretrain.batch_size", "pretrain.threads"),
                         config_help="config file; its 'pretrain' section is used")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config.from_args(args)["pretrain"]
    grade.core.cli.check_new_output(args.out, features=args.features)
    with distributed.session() as ctx:
        pretrain(args.features, args.out, cfg, rank=ctx.rank, world_size=ctx.world_size,
                 all_reduce=distributed.GradientAverager() if ctx.distributed else None)
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
