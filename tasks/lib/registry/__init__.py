"""The model registry, in one place.

* ``production``: what serves on this machine, ``models/production/<N>/`` (TF Serving's
  layout) and its append-only history ``models/registry.json``, written crash-safely;
* ``tags``: what the team sees, GTO's git tags (``mnist-mlp@vN.0.0``, stage ``prod``), which
  ``dvc artifacts get`` reads;
* ``rollback``: serving an earlier version again.

`python -m tasks.commands.registry` is its command line; the promote stage publishes through it.
"""
