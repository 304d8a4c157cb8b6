"""Stage 2: GRPO fine-tuning with adaptive Dirichlet exploration, a composite reward and a KL anchor.

    python -m components.finetune --features URI --init STAGE1_DIR --out URI [--config YAML]

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

import grade.cli
from grade import config, distributed


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, metavar="URI",
                   help="published features folder (components.features output), local path or s3://")
    p.add_argument("--init", required=True, metavar="URI",
                   help="Stage 1 model folder (components.pretrain output): initial policy and KL reference")
    p.add_argument("--out", required=True, metavar="URI", help="output model folder, local path or s3://")
    p.add_argument("--config", metavar="YAML", help="config file; its 'finetune' section is used")
    p.add_argument("--group-size", type=int, help="G: weight vectors sampled per request (finetune.group_size)")
    p.add_argument("--exploration", choices=["dirichlet", "gaussian"], help="finetune.exploration")
    p.add_argument("--adaptive-kappa", type=_bool, metavar="true|false",
                   help="learn kappa per request (finetune.adaptive_kappa); false uses finetune.fixed_kappa")
    p.add_argument("--fixed-kappa", type=float, help="finetune.fixed_kappa")
    p.add_argument("--reward-post", type=float, help="lambda of the posterior term (finetune.reward.post)")
    p.add_argument("--reward-prior", type=float, help="lambda of the prior term (finetune.reward.prior)")
    p.add_argument("--reward-format", type=float, help="lambda of the format term (finetune.reward.format)")
    p.add_argument("--kl-coef", type=float, help="beta of the KL to Stage 1 (finetune.kl_coef)")
    p.add_argument("--clip", type=float, help="epsilon of the clipped ratio (finetune.clip)")
    p.add_argument("--lr", type=float, help="learning rate (finetune.lr)")
    p.add_argument("--epochs", type=int, help="passes over the train split (finetune.epochs)")
    p.add_argument("--max-steps", type=int, help="stop after N steps, 0 = all epochs (finetune.max_steps)")
    p.add_argument("--batch-size", type=int, help="requests per step, over all processes (finetune.batch_size)")
    p.add_argument("--seed", type=int, help="finetune.seed")
    return p


def overrides(args: argparse.Namespace) -> dict:
    """Config overrides from the flags that were given (nested keys for the reward)."""
    flat = {"group_size": args.group_size, "exploration": args.exploration, "adaptive_kappa": args.adaptive_kappa,
            "fixed_kappa": args.fixed_kappa, "kl_coef": args.kl_coef, "clip": args.clip, "lr": args.lr,
            "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed}
    out = {k: v for k, v in flat.items() if v is not None}
    reward = {k: v for k, v in (("post", args.reward_post), ("prior", args.reward_prior),
                                ("format", args.reward_format)) if v is not None}
    if reward:
        out["reward"] = reward
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = config.load_yaml(args.config)
    section = dict(data.get("finetune") or {})
    extra = overrides(args)
    if "reward" in extra:
        section["reward"] = {**(section.get("reward") or {}), **extra.pop("reward")}
    section.update(extra)
    for name, values in data.items():
        if name != "finetune":
            config.build(config.section_class(name), values, name)
    cfg = config.build(config.section_class("finetune"), section, "finetune")

    from grade.finetune import finetune

    grade.cli.log.info("finetune config: %s", json.dumps(config.to_dict(cfg), sort_keys=True))
    with distributed.session() as ctx:
        metrics = finetune(args.features, args.init, args.out, cfg, rank=ctx.rank, world_size=ctx.world_size)
    if not ctx.is_main:
        return 0
    summary = {"out": args.out, "steps": metrics["steps"], "requests_per_s": metrics["requests_per_s"],
               "lift_vs_stage1": {k: v for k, v in metrics["lift_vs_stage1"].items() if k.startswith("true/")}}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(grade.cli.run(main))
