"""Evaluation of served targets on skills (``hotmerge eval``) and merge sweeps (``hotmerge sweep``).

grid (candidates) -> eval (scores through the server) -> sweep (resumable run, ranking) ->
pareto (front, criterion) -> report / plot (files).
"""
