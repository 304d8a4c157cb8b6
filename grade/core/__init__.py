"""Core: errors, configuration, the command line, progress, the store and its backends, processes.

No knowledge of ranking lives here; every other layer stands on it.
"""
