"""Pruning quality: the evaluation harness, its near-lossless gates, and the reference-MoE benchmark.

Needs the ``torch`` extra.
"""
