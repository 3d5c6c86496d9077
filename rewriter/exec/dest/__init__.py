"""Destinations and the state of a run kept in them: lock, journal, status, cleanup."""
