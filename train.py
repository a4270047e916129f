"""`python train.py --config X`: the same command as `minivlm-train --config X` once minivlm is
pip-installed. The code is minivlm/cli/train.py, inside the package so that the installed command
runs it too."""

from minivlm.cli.train import main

if __name__ == "__main__":
    main()
