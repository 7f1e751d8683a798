"""Helpers shared by the pipeline, result, schema and crash tests."""
