"""`loratune sweep`: a hyperparameter search over ordinary training runs, with Optuna's study as the record.

space: what is searched (the Training Guide's ranges, or a YAML file checked against TrainConfig); study: where the
study lives (SQLite in the sweep folder, or a shared database) and which trials count; trial: one trial as a
`loratune train` child process, followed and pruned through its metrics.jsonl; results: the table, importances,
plot and best.yaml. Only commands.sweep imports this package.
"""
