"""Replay: a recorded run rebuilt from its store (data, model at any checkpoint) and its
trajectory replayed step by step, checked against the stored checkpoints. Reads stores; never
imports the recording layer."""
