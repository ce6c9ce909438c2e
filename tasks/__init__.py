"""Stage code: one module per DVC stage (download, train, evaluate, promote), each a plain typed
function plus a `python -m tasks.<stage>` entry, and the shared pieces they use (params, mnist,
model, trainer, plots). Nothing here imports Prefect."""
