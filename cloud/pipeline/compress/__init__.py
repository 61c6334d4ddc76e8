"""Compression beyond INT8: distillation, pruning and FP16, each behind the accuracy gate."""
