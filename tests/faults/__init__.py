"""Fault-injection suite: real processes on loopback, faults injected under load."""
