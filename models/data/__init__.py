"""Training data: the traffic simulator, importers and dataset loading."""
