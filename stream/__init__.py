"""Streaming detector: Faust app, agents, tables, scoring."""
