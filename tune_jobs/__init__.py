"""Ray Tune drivers over `tpv.train`: the tasks x seeds sweep, few-shot transfer, combination-weight search.

A thin layer: every trial calls tpv's own training/evaluation code (`tune_jobs.trial.train_trial`); Ray appears
only here and in `serve/`. Each module has a `main(argv) -> int` that the `tpv` command wires up:

- `tune_jobs.sweep`     `tpv sweep`           tasks x origin seeds (x backbones) -> vectors in the store
- `tune_jobs.report`    `tpv report`          cosine similarity table + heatmap (and the cross-origin table)
- `tune_jobs.transfer`  `tpv transfer`        few-shot transfer: random / SPoT / multi-SPoT / TPV / TPV-auto inits
- `tune_jobs.weights`   `tpv search-weights`  the paper's coefficient grid and per-vector weights (Optuna)
- `tune_jobs.main_job`  `tpv demo`            the README's first command: sweep, report, one transfer experiment
"""
