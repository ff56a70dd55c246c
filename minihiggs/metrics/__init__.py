"""Experiment metrics: the logger interface and its sinks (`logger`, `jsonl`), reading them back, loss plots."""

from .jsonl import JsonlSink, read_metrics, series
from .logger import MetricLogger, make_logger

__all__ = ["JsonlSink", "MetricLogger", "make_logger", "read_metrics", "series"]
