"""slidr: real-time slice-level detection of robotic ad clicks."""

__version__ = "0.1.0"
