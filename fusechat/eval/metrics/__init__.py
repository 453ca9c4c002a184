"""Metric scripts in `evaluate`'s module layout, loaded by path (`evaluate.load(path)`): the hub's
metric scripts cannot be fetched offline, and these are the ones the evaluation stage needs."""
