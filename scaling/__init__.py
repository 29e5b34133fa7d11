"""Autoscaling: Serve policies (pure functions of AutoscalingContext), load forecasting, traces and the
trace simulator."""
