"""``python -m provisioning.cli``: the same as the ``provision`` console script."""

from . import main

main()
