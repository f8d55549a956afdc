"""Evaluation tasks and metrics for `bigmodel evaluate`."""
