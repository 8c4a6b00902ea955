"""User hook for metrics: `posttrain.metrics.add_sink(fn)`; fn(metrics_dict) is called every step on
rank 0 (e.g. to forward to W&B or MLflow). The dict has step, loss, lr, grad_norm, tokens_per_s,
step_time_s, data_wait, padding, mfu, hfu, peak_mem_gb and recipe-specific keys (mfu and hfu are None,
with mfu_unreliable: True, when the device peak is implausible). W&B and MLflow are built in:
compute.wandb, compute.mlflow (docs/tracking.md)."""

from .compute.metrics import add_sink

__all__ = ["add_sink"]
