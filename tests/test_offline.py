"""A new user's first minutes without network: every --help answers before torch is imported;
--dry-run on a seed recipe plans from configs/real/ without asking the hub; a hub that cannot be
reached costs one try, not huggingface_hub's retries.

The hub here is a local endpoint (HF_ENDPOINT) that counts the connections made to it and closes
each before its TLS handshake: to huggingface_hub, a ConnectError, as with no network at all, which
it retries five times for each file not in its cache (10 connections and 28 s for one --dry-run).
"""

from __future__ import annotations

import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "datasets", "bitsandbytes", "matplotlib", "peft"}


def commands() -> list[list[str]]:
    """Every command the project has, as it is run: train.py and infer.py, and each file that parses
    arguments when run (modules of the package with -m)."""
    files = [*ROOT.glob("*.py"), *(f for d in ("minivlm", "demo", "bench", "tests") for f in (ROOT / d).rglob("*.py"))]
    found = [["train.py"], ["infer.py"]]
    for f in sorted(files):
        text = f.read_text()
        if "ArgumentParser(" in text and re.search(r'^if __name__ == "__main__":', text, re.MULTILINE):
            name = f.relative_to(ROOT)
            found.append(["-m", ".".join(name.with_suffix("").parts)] if name.parts[0] == "minivlm" else [str(name)])
    return found


def test_the_command_list_holds_every_script():
    listed = {" ".join(c) for c in commands()}
    assert {"walkthrough.py", "-m minivlm.data", "-m minivlm.export", "-m minivlm.models.llava_phi2",
            "demo/pretrain_base.py", "bench/compare.py", "bench/ablate.py", "tests/readme_check.py"} <= listed


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_help_answers_without_importing_torch(command):
    """-X importtime names every module the command imported; none of the heavy libraries may be
    among them. (Times are in the log, not asserted: the machine's load decides them.)"""
    proc = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stdout[-2000:] + proc.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & HEAVY, sorted(imported & HEAVY)


class Hub(socketserver.ThreadingTCPServer):
    """An https endpoint that counts connections and closes each before a TLS handshake."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), socketserver.BaseRequestHandler)  # handle() does nothing
        self.connections = 0

    def verify_request(self, request, client_address) -> bool:
        self.connections += 1
        return True

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def hub():
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run(args: list[str], hub: Hub, cache: Path, offline: bool = False) -> subprocess.CompletedProcess:
    """A command with the hub at `hub`, its cache at `cache`, and HF_HUB_OFFLINE as a user sets it."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def put_in_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """`files` as the hub cache holds `repo_id` after a download: a snapshot that refs/main names."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(shutil.copytree(files, repo / "snapshots" / commit))


def test_dry_run_of_a_seed_recipe_plans_from_its_copy_in_configs_real_without_the_network(hub, tmp_path):
    proc = run(["train.py", "--config", "configs/paligemma.toml", "--dry-run"], hub, tmp_path / "empty-cache")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == ("  note: planning from configs/real/paligemma-3b-pt-224/, a copy of "
                        "google/paligemma-3b-pt-224's config (no download)")
    assert "126 linears, 1,981,808,640 params" in proc.stdout  # the real PaliGemma-3B's decoder
    assert hub.connections == 0


def test_dry_run_prefers_the_hub_cache_to_the_copy(hub, tmp_path):
    """A downloaded checkpoint's own config.json is read, from the cache, still without a request."""
    snapshot = put_in_cache(tmp_path / "cache", "google/paligemma-3b-pt-224", ROOT / "configs/real/paligemma-3b-pt-224")
    config = (snapshot / "config.json").read_text()
    (snapshot / "config.json").write_text(re.sub(r'"num_hidden_layers": 18', '"num_hidden_layers": 9', config))
    proc = run(["train.py", "--config", "configs/paligemma.toml", "--dry-run"], hub, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stdout and "63 linears" in proc.stdout  # 9 layers of 7
    assert hub.connections == 0


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable", "HF_HUB_OFFLINE=1"])
def test_dry_run_of_a_hub_id_without_a_copy_fails_after_one_try(hub, tmp_path, offline):
    """Unreachable: one request, then the error. The user's HF_HUB_OFFLINE=1: none."""
    proc = run(["train.py", "--config", "configs/paligemma.toml", "--dry-run",
                "--set", "model.name_or_path=nobody/no-such-model"], hub, tmp_path, offline)
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    reason = "(HF_HUB_OFFLINE=1)" if offline else f"({hub.url} cannot be reached: "
    assert f"model.name_or_path = 'nobody/no-such-model' is not a local directory, and this hub id is not in the " \
           f"Hugging Face cache {reason}" in message
    assert "configs/real/" in message
    assert hub.connections == (0 if offline else 1)


def test_training_on_an_uncached_hub_id_fails_after_one_try(hub, tmp_path, shapes_data):
    proc = run(["train.py", "--config", "configs/demo.toml", "--set", "model.name_or_path=nobody/no-such-model",
                "--set", f"data.dataset={shapes_data}", "--set", f"train.output_dir={tmp_path / 'run'}"],
               hub, tmp_path / "cache")
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert f"not in the Hugging Face cache ({hub.url} cannot be reached: " in message
    assert hub.connections == 1


def test_a_cached_hub_id_loads_from_the_cache_after_one_try(hub, tmp_path, tiny_paligemma, shapes_data):
    """Processor, config and weights all come from the cache: the one probe is the only request."""
    put_in_cache(tmp_path / "cache", "nobody/tiny-paligemma", tiny_paligemma)
    image = sorted((shapes_data / "test").glob("*.png"))[0]
    proc = run(["infer.py", "--config", "configs/demo.toml", "--set", "model.name_or_path=nobody/tiny-paligemma",
                "--image", str(image), "--prompt", "what color is the shape"], hub, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {hub.url} cannot be reached: " in proc.stderr
    assert "nobody/tiny-paligemma is read from the Hugging Face cache" in proc.stderr
    assert hub.connections == 1
