"""Evaluate: the offline auction of every policy on held-out requests, its report and the estimator
check. A peer of train and release."""
