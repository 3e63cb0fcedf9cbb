"""Socially aware contrastive learning for dialog safety: a reproducible DVC pipeline.

Run any stage with `python -m pipeline <stage> ...`; `python -m pipeline --help` lists them.
"""

__version__ = "0.1.0"
