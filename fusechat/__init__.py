"""fusechat: fuse several chat models into one small model."""
__version__ = "0.1.0"
