"""Stage 2: GRPO fine-tuning with adaptive Dirichlet exploration, a composite reward and a KL anchor.

    python -m components.finetune --features URI --init STAGE1_DIR --out URI [--config YAML]
                                  [--set SECTION.KEY=VALUE ...]

The Stage 1 model folder (components.pretrain output) initialises the policy and is the frozen KL
reference. Writes a model folder like Stage 1's (policy.safetensors, policy.json, feature_spec.json,
config.json, metrics.json with the validation curve, train_log.jsonl) atomically; checkpoints go to
<out>/_checkpoints/ and a re-run on the same --out resumes from the last one.

Data-parallel on several processes (docs/distributed.md): launched by torchrun, e.g.

    torchrun --standalone --nproc-per-node 2 -m components.finetune --features URI --init URI --out URI

each rank streams its share of every global batch (--batch-size is the global batch) and all ranks
draw the same samples; only rank 0 validates and writes; a re-run with the same number of processes
resumes.
"""

from __future__ import annotations

import argparse
import json
import sys

import grade.core.cli
from grade.core import config, distributed

#: config keys with a flag of their own (--group-size, --reward-post, ...); any other key: --set
FLAGS = (*(f"finetune.{key}" for key in (
    "group_size", "reward.post", "reward.prior", "reward.format", "kl_coef", "clip", "lr", "epochs",
    "max_steps", "batch_size")), "ablation.exploration", "ablation.adaptive_kappa", "ablation.preset",
    "finetune.fixed_kappa", "shared.seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, metavar="URI",
                   help="published features folder (components.features output), local path or s3://")
    p.add_argument("--init", required=True, metavar="URI",
                   help="Stage 1 model folder (components.pretrain output): initial policy and KL reference")
    p.add_argument("--out", required=True, metavar="URI", help="output model folder, local path or s3://")
    p.add_argument("--outcome", metavar="URI",
                   help="value model (components.outcome output) for the posterior's estimator; without it "
                        "one is fitted on --features with the config's 'value_model' section")
    config.add_arguments(p, FLAGS, config_help="config file; its 'finetune' section is used")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sections = config.from_args(args)
    grade.core.cli.check_new_output(args.out, features=args.features, init=args.init, outcome=args.outcome)
    cfg = sections["finetune"]

    from grade.train.finetune import finetune

    grade.core.cli.log.info("finetune config: %s", json.dumps(config.to_dict(cfg), sort_keys=True))
    with distributed.session() as ctx:
        metrics = finetune(args.features, args.init, args.out, cfg, rank=ctx.rank, world_size=ctx.world_size,
                           business=sections["business"], outcome_uri=args.outcome,
                           outcome_cfg=sections["value_model"])
    if not ctx.is_main:
        return 0
    summary = {"out": args.out, "steps": metrics["steps"], "requests_per_s": metrics["requests_per_s"],
               "lift_vs_stage1": {k: v for k, v in metrics["lift_vs_stage1"].items()
                                  if k.startswith("true/")}}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(grade.core.cli.run(main))
