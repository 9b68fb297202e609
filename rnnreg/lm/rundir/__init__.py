"""The run directory: its layout and lock (layout), atomic files (files), the checkpoint format
(checkpoint), metrics, TensorBoard scalars and learning curves (metrics, events, curves) and
provenance."""
