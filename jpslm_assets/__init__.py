"""Dagster assets that build domain-specialist Japanese small language models."""
