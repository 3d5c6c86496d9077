"""Running and verifying a plan on Ray."""
