"""Optuna studies over the method's thresholds and loss weights (``ssod-tune``, ``ssod/tune.py``).

- ``settings``: the ``tune`` config group (schema, loading, how overrides are written);
- ``space``: the search space in YAML -> ``trial.suggest_*`` -> Hydra overrides;
- ``storage``: which Optuna storage, opened how; dead-worker reaper; the shared budget;
- ``objective``: one trial = compose a config, train (in-process or ``accelerate launch``);
- ``workers``: the worker loop and the launcher of N local workers;
- ``report``: the study's parent MLflow run, trial-run states, best params and plots.
"""
