"""quantkit: post-training quantization for large language models.

Importing the package is cheap: torch, transformers and friends load only when
a function that needs them runs (so `quantkit --help` is instant).
"""

__version__ = "0.1.0"
