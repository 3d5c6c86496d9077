"""Tests of profiling/ (torch)."""
