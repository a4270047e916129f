"""The command lines: train.py and infer.py at the repository's root run these, and so do the
console commands `minivlm-train` and `minivlm-infer` that `pip install` puts on the PATH
(pyproject.toml). They look up the family's and the objective's modules and hand them on.

The console commands call the functions below, not each `main` directly: a console script exits
with what its function returns (`sys.exit(main())`), and main returns the run's figures for the
tests and scripts that call it, which sys.exit would print as an error and exit 1. They are not named `train` and `infer`:
importing the submodule minivlm.cli.train sets the package's attribute `train` to the module,
so a function of that name would be one thing or the other depending on what was imported first.
"""


def train_command() -> None:
    """minivlm-train: `python train.py`."""
    from minivlm.cli.train import main
    main()


def infer_command() -> None:
    """minivlm-infer: `python infer.py`."""
    from minivlm.cli.infer import main
    main()


def export_command() -> None:
    """minivlm-export: `python -m minivlm.export`."""
    from minivlm.export import main
    main()
