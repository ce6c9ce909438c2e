"""Commands beside the four stages, each `python -m tasks.commands.<name>`: check_params, predict,
experiments, registry, pull and offline_plots. None of them is a DVC stage."""
