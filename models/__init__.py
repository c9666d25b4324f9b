"""Model pipeline: data, training, export, calibration, registry, guardrails."""
