"""Fidelity of KV policies against dense attention on the bundled model (docs/fidelity.md)."""
