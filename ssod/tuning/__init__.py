"""Optuna studies over the method's thresholds and loss weights (``ssod-tune``, ``ssod/tune.py``).

- ``schema`` / ``settings``: the ``tune`` config group, loading it, override syntax;
- ``space``: the search space in YAML -> ``trial.suggest_*`` -> Hydra overrides;
- ``storage``: which Optuna storage, opened how; the dead-worker reaper; the shared budget;
- ``objective``: one trial = compose a config, train, report evaluations to the pruner;
- ``child``: a trial as an ``accelerate launch`` process group, relaying its evaluations;
- ``processes``: liveness of workers and process groups on this machine;
- ``workers``: the worker loop and the launcher of N local workers;
- ``report``: the study's parent MLflow run, trial-run states, best params and plots.
"""
