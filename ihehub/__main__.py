"""``python -m ihehub`` is the ``ihehub`` command."""

from ihehub.cli import main

main()
