"""Tests of the CLI: options, errors, output, Ray Jobs commands."""
