"""Tests of rewriter/exec/: copying, destinations, the runs (local, Ray), verify, card."""
