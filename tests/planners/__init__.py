"""Tests of planners/: policies, plans, cost, serving rules."""
