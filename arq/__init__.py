"""ARQ: mixed-precision quantization that keeps certified robustness (reference implementation)."""

__version__ = "0.1.0"
