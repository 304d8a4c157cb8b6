"""Release: the blessing, the promotion gate, batch scoring and online serving. A peer of train and
evaluate."""
