"""Parallelism applied to an unmodified model: sequence, pipeline, data/ZeRO."""
