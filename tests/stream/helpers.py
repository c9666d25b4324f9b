"""Click generators of the stream tests (they live in stream/synth.py so benchmarks can use them too)."""

from stream.synth import T0, click, traffic

__all__ = ["T0", "click", "traffic"]
