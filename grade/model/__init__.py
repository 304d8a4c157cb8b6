"""Model: the policy network, its learning-to-rank loss, the training runtime and the registry of
published policies."""
