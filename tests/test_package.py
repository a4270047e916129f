"""pyproject.toml: `pip install .` gives the three commands, which run a 2-step training outside
the repository; and the versions it pins are the ones these tests run with."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """name -> version of every `name==version` in the dependencies and the extras."""
    project = PYPROJECT["project"]
    listed = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    return dict(re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", d).groups() for d in listed if "==" in d)


def test_every_pin_is_the_version_installed_here():
    """What `pip install minivlm` pins is what make test ran with (make installs .[test])."""
    found = pins()
    assert {"torch", "transformers", "bitsandbytes", "gradio", "wandb", "tensorboard", "trackio", "pytest"} <= set(found)
    # "2.13.0+cpu" is 2.13.0 to pip: a pin ignores the local label after "+"
    wrong = {name: (pinned, importlib.metadata.version(name)) for name, pinned in found.items()
             if importlib.metadata.version(name).split("+")[0] != pinned}
    assert not wrong, f"pinned -> installed: {wrong}"


def test_pip_install_puts_the_commands_on_the_path_and_they_train_outside_the_repository(
        tiny_paligemma, shapes_data, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin/python"
    # A fresh venv, its dependencies read from this one's site-packages through a .pth line (a full
    # download of torch and the rest would take minutes; `pip install .` in an empty venv is in the
    # README and was run by hand). minivlm itself is built and installed from the source tree.
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}
    # The venv's own setuptools (65, bundled with Python 3.11) cannot build a wheel without the
    # `wheel` package: build with this venv's, as pyproject's build-system asks (>= 68).
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], env=env, check=True, capture_output=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)

    where = subprocess.run([python, "-c", "import minivlm.cli.train as t; print(t.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), f"minivlm imported from {where}, not the installed copy"
    for command, usage in [("minivlm-train", "--config CONFIG"), ("minivlm-infer", "--checkpoint"),
                           ("minivlm-export", "--merge")]:
        shown = subprocess.run([env_dir / "bin" / command, "--help"], cwd=tmp_path, env=env, capture_output=True,
                               text=True)
        assert shown.returncode == 0 and f"usage: {command}" in shown.stdout and usage in shown.stdout, shown

    sets = [f"model.name_or_path={tiny_paligemma}", f"data.dataset={shapes_data}", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2", "train.batch_size=4", "data.eval_samples=4"]
    ran = subprocess.run([env_dir / "bin/minivlm-train", "--config", str(ROOT / "configs/demo.toml"),
                          *sum((["--set", s] for s in sets), [])], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["steps"] == 2 and "accuracy_after" in metrics
    assert [json.loads(line)["step"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()] == [0, 1, 2]
