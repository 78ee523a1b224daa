"""Analyses: each returns tidy DataFrames or small dataclasses; none reads log formats."""
