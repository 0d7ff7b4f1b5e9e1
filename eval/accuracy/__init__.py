"""`raas-eval`: task accuracy through an OpenAI-compatible endpoint, per KV policy and budget.

The fidelity study (eval/study.py) measures how far a policy's next-token distribution
drifts from dense attention; this package answers the user's question instead: on my model
and my problems, how many answers does a KV budget cost, and how much KV does it save?
"""
