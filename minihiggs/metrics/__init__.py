"""Experiment metrics: the logger interface (`logger`) and its sinks (`jsonl`, `tensorboard`, `wandb_sink`; the
scalars they show: `scalars`), reading metrics.jsonl back, loss plots (`plot`, matplotlib)."""

from .jsonl import JsonlSink, read_metrics, series
from .logger import REPORT_TO, MetricLogger, make_logger

__all__ = ["JsonlSink", "MetricLogger", "REPORT_TO", "make_logger", "read_metrics", "series"]
