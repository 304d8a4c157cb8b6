"""Value: what a ranking is worth (declared business value, examination, outcome and value model,
estimators, auction metrics, the reward and its guardrails, baselines). Training and evaluation both
stand on it."""
