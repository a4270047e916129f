"""The command lines: train.py and infer.py at the repository's root run these, and so do the
console commands `minivlm-train` and `minivlm-infer` that `pip install` puts on the PATH
(pyproject.toml). They look up the family's and the objective's modules and hand them on."""
