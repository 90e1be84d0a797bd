"""Steering reasoning models (ASC, hybrid base/thinking steering) and vector export."""
