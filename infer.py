"""`python infer.py --config X ...`: the same command as `minivlm-infer --config X ...` once minivlm
is pip-installed. The code is minivlm/cli/infer.py, inside the package so that the installed command
runs it too."""

from minivlm.cli.infer import main

if __name__ == "__main__":
    main()
