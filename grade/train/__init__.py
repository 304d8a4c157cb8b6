"""Train: Stage 1 (LambdaLoss pretraining) and Stage 2 (GRPO fine-tuning). A peer of evaluate and
release: the three never import one another."""
