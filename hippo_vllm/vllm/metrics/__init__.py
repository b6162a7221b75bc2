"""Hippo's counters, and how they reach vLLM's periodic log and /metrics."""
