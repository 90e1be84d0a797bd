"""Probes on reasoning activations (confidence, deviation, overthinking)."""
