"""Data: logs in, tensors out (simulator, features, rolling window, feature transform, dataset).

The ranking rule (``fusion``) lives here because the simulator logs the rankings it makes with it.
"""
