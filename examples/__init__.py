"""Worked examples that use focal's operators in real models."""
