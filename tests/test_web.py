"""infer.py --web: the page, served by a real `infer.py --web` process and driven in headless Chromium,
answers as infer.py does with --checkpoint (fine-tuned) and without it (base); its Run tab shows the
run's metrics.json and curves.png."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
# The command lines' main functions: minivlm.cli's own `infer` and `train` are the console commands'.
from minivlm.cli.infer import main as infer
from minivlm.cli.train import main as train
from minivlm.config import to_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def chromium() -> str:
    """Debian's Chromium: Playwright cannot download its own browsers on this machine."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("tests/test_web.py drives the page in Chromium, which is not installed: apt-get install chromium",
                    pytrace=False)
    return path


def write_toml(cfg: dict, path: Path) -> Path:
    """A config dict as TOML, each table's keys written as JSON values (JSON's strings, numbers,
    booleans, lists and empty objects are TOML's too); None, TOML's missing key, means the default."""
    path.write_text("".join(f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()
                                                     if value is not None) for table, values in cfg.items()))
    return path


@pytest.fixture(scope="module")
def trained(tiny_paligemma, shapes_data, tmp_path_factory) -> Path:
    """A tiny QLoRA run's config, trained until its greedy answers are not the base model's; the
    run is <the config's folder>/run. The random tiny base learns little in seconds (its logits are
    nearly flat), but every answer starting with the same word, it writes that word within a dozen
    steps, where the base writes newlines (answers "")."""
    out = tmp_path_factory.mktemp("web")
    cfg = to_dict(tiny_config(tiny_paligemma, shapes_data, out / "run", max_steps=12, lr=1e-2))
    cfg["data"]["answer_template"] = "the answer is {answer}"
    config = write_toml(cfg, out / "tiny.toml")
    train(["--config", str(config)])
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(port: int, server: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Until the local server accepts a connection on `port` (nothing leaves this machine)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"infer.py --web exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"infer.py --web did not serve port {port} in {seconds} s:\n{log.read_text()[-3000:]}")


def test_the_page_answers_as_infer_does_with_and_without_the_adapter(trained, shapes_data, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    browser_path = chromium()
    run, port = trained.parent / "run", free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "--config", str(trained), "--checkpoint",
                               str(run / "last"), "--web", "--port", str(port)], env=ENV,
                              cwd=tmp_path,  # gradio writes a .gradio folder where it runs: not in the repository
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        # While the server starts: infer.py's own answers, with and without the adapter.
        rows = [json.loads(line) for line in (shapes_data / "test/metadata.jsonl").read_text().splitlines()]
        image, question = shapes_data / "test" / rows[0]["file_name"], rows[0]["question"]
        asked = ["--config", str(trained), "--image", str(image), "--prompt", question]
        tuned = infer([*asked, "--checkpoint", str(run / "last")])[0]["answer"]
        base = infer(asked)[0]["answer"]
        # Else a page that gave the same answer twice (adapters never off, or never loaded) would pass.
        assert tuned and base != tuned
        wait_until_served(port, server, log)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            elsewhere = []  # the page must load offline: nothing fetched from a CDN or a font server
            page.on("request", lambda r: r.url.startswith((url, "data:", "blob:")) or elsewhere.append(r.url))
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(image)
            page.locator("#question textarea").fill(question)
            page.locator("#ask").click()
            answers = [page.locator(f"#{box}-answer textarea") for box in ("base", "tuned")]
            # One event writes both answers: once the fine-tuned one shows, the base one (maybe "") is there too.
            expect(answers[1]).not_to_have_value("", timeout=30_000)
            page.screenshot(path=tmp_path / "web.png", full_page=True)
            assert [a.input_value() for a in answers] == [base, tuned]

            # A row of the eval split fills in its image, question and reference, and clears the answers.
            uploaded = page.locator("#image img").get_attribute("src")
            page.locator("#example input").click()
            page.get_by_role("option", name=f"test row 1: {rows[1]['question']}").click()
            expect(page.locator("#question textarea")).to_have_value(rows[1]["question"])
            expect(page.locator("#reference textarea")).to_have_value(f"the answer is {rows[1]['answer']}")
            expect(answers[1]).to_have_value("")
            expect(page.locator("#image img")).not_to_have_attribute("src", uploaded)

            page.get_by_role("tab", name="Run").click()
            metrics = json.loads((run / "metrics.json").read_text())
            expect(page.locator("#metrics tr").filter(has_text="val_loss_after")).to_contain_text(
                f"{metrics['val_loss_after']:.4g}")
            expect(page.locator("#curves img")).to_be_visible()
            browser.close()
        assert not elsewhere
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_run_is_found_from_any_path_to_its_checkpoint(trained, tmp_path):
    from minivlm.web import run_dir, run_view

    run = trained.parent / "run"
    step = (run / "last").resolve()
    assert step.parent.name == "checkpoints"  # `last` is a link into run/checkpoints, not a folder of run
    assert run_dir(run / "last") == run_dir(step) == run.resolve()
    curves, text = run_view(run / "last")
    assert curves is not None and "accuracy_after" in text
    copied = shutil.copytree(step, tmp_path / "adapter")  # an adapter alone, away from its run
    assert run_view(copied) == (None, f"Run directory: `{copied}`\n\nno curves.png yet\n\nno metrics.json yet")


def test_web_needs_gradio_a_checkpoint_and_no_question_of_its_own(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets without it installed
    monkeypatch.delitem(sys.modules, "minivlm.web", raising=False)  # imported afresh, by the import system
    monkeypatch.delattr("minivlm.web", raising=False)  # not found as the package's attribute
    checkpoint = str(trained.parent / "run/last")
    with pytest.raises(SystemExit, match=r"^error: --web needs gradio: pip install 'minivlm\[web\]'$"):
        infer(["--config", str(trained), "--checkpoint", checkpoint, "--web"])
    with pytest.raises(SystemExit, match="--web shows the base model beside a trained adapter: give --checkpoint"):
        infer(["--config", str(trained), "--web"])
    with pytest.raises(SystemExit, match="--web takes its image and question on the page"):
        infer(["--config", str(trained), "--checkpoint", checkpoint, "--web", "--prompt", "what shape is it"])
