"""Tests of quality/ (torch)."""
