"""``python -m pgskewer``: the ``pgskewer`` command."""

from pgskewer.cli import run

if __name__ == "__main__":
    run()
