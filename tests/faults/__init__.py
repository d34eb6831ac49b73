"""Fault injection: signals, damaged checkpoints, a full disk, bad data, bad configs,
NaNs and crafted workdirs, each recorded so docs/reliability.md is written by the suite."""
