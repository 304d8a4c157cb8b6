"""GRADE-MTF: personalised multi-task fusion for ranking.

The core library. Pure Python + PyTorch + Arrow; it never imports KFP.
"""

__version__ = "0.1.0"
