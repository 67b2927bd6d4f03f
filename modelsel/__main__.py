"""``python -m modelsel``: the same command line as the ``modelsel`` console script."""

from modelsel.cli import entry_point

if __name__ == "__main__":
    entry_point()
