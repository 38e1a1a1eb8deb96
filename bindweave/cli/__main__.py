"""``python -m bindweave.cli`` (and ``torchrun -m bindweave.cli``): the ``bindweave`` command."""

from bindweave.cli.command import main

main()
