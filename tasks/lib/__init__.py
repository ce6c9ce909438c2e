"""Library code the stages and commands share: params, data, the network and its trainer, the
schedules, checkpoints, plots, the model registry, and the git/DVC plumbing. Nothing here is an
entry point, and nothing here imports Prefect or a stage module."""
