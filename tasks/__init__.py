"""The pipeline's code. The four DVC stages are the modules at this level (`python -m
tasks.download|train|evaluate|promote`); other commands are in ``tasks.commands``; the code they
share is in ``tasks.lib``. Nothing here imports Prefect (that is ``flows/``)."""
