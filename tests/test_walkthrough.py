"""walkthrough.py (make walkthrough): one real step, printed in the order of docs/qlora.md, each comparison true;
and every `file:function` that the doc and the walkthrough point to exists."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from conftest import ROOT, save_paligemma
import walkthrough

DOC = ROOT / "docs" / "qlora.md"
REFERENCE = re.compile(r"\b((?:minivlm/[\w/]+|train|infer|walkthrough)\.py):([A-Za-z_][\w.]*\w)")


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes_data) -> tuple[dict, str]:
    """The walkthrough on a random PaliGemma of the demo base's sizes (width 128, MLP 512; 2 layers,
    not 4): its gate/up/down adapters hold 4096 values, so some of them get 8-bit Adam state.
    (`make base` trains the real demo base in 99 s; the test suite does not wait for it.)"""
    base = save_paligemma(tmp_path_factory.mktemp("demo-sized"), hidden=128, layers=2)
    out = io.StringIO()
    formatwarning = warnings.formatwarning  # main() sets the command-line format; put Python's back
    try:
        with contextlib.redirect_stdout(out):
            facts = walkthrough.main(["--config", str(ROOT / "configs" / "demo.toml"),
                                      "--set", f'model.name_or_path="{base}"', "--set", f'data.dataset="{shapes_data}"'])
    finally:
        warnings.formatwarning = formatwarning
    return facts, out.getvalue()


def test_walkthrough_step_agrees_with_bitsandbytes_and_the_loop(run):
    facts, _ = run
    # bitsandbytes itself, called here on the walkthrough's W: both the reference's tensors and
    # those the model's 4-bit layer holds must be its own, bit for bit.
    F = bnb.functional
    codes, state = F.quantize_4bit(facts["W"], blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {"code book": state.code, "packed codes": codes, "absmax": state.absmax,
              "dequantized W": F.dequantize_4bit(codes, state), "offset": state.offset,
              "absmax's absmax": state.state2.absmax}
    assert facts["nf4"].keys() == theirs.keys()
    for name, (reference, in_model) in facts["nf4"].items():
        assert torch.equal(reference, theirs[name]) and torch.equal(in_model, theirs[name]), name
    # One AdamW8bit step of bitsandbytes on the walkthrough's parameter and gradient (8-bit state:
    # the tensor holds 4096 values or more).
    step = facts["adam_step"]
    param = torch.nn.Parameter(step["parameter"].clone())
    param.grad = step["gradient"].clone()
    assert param.numel() >= 4096
    optimizer = bnb.optim.AdamW8bit([param], lr=step["lr"], betas=step["betas"], eps=step["eps"],
                                    weight_decay=step["weight_decay"])
    optimizer.step()
    s = optimizer.state[param]
    theirs = {"parameter": param.detach(), "m codes": s["state1"], "m absmax": s["absmax1"], "v codes": s["state2"],
              "v absmax": s["absmax2"]}
    assert facts["adam"].keys() == theirs.keys()
    for name, (reference, in_loop) in facts["adam"].items():
        assert torch.equal(reference, theirs[name]) and torch.equal(in_loop, theirs[name]), name
    # backward_window's loss is the one answer_loss_sum measured, with the same dropout masks.
    assert facts["backward_loss_per_token"] == pytest.approx(facts["loss_per_token"], rel=1e-6)
    # Two token-normalised micro-batches give the one-batch gradient; a mean of means does not.
    assert facts["accumulation_error"] < 1e-4
    assert facts["mean_of_means_error"] > 100 * facts["accumulation_error"]
    assert facts["checkpoint"] == ["adapter.safetensors", "state.json", "state.safetensors"]


def test_walkthrough_prints_the_sections_of_the_doc_in_order(run):
    _, printed = run
    doc_sections = re.findall(r"^## (\d+)\. (.+)$", DOC.read_text(), flags=re.M)
    printed_sections = re.findall(r"^§(\d+) ([^·].*?) — ", printed, flags=re.M)
    assert printed_sections == doc_sections
    # §4's variants: the doc's ### headings there, printed as "§4 · title".
    inject = DOC.read_text().split("\n## 4. ")[1].split("\n## 5. ")[0]
    assert re.findall(r"^§4 · (.+?) — ", printed, flags=re.M) == re.findall(r"^### (.+)$", inject, flags=re.M)
    assert [title for _, title in doc_sections] == walkthrough.STAGES
    # One function per section, in the doc's order: the doc and the code keep the same outline.
    assert [f.__doc__.split(":")[0] for f in walkthrough.SECTIONS] == [f"§{n}" for n, _ in doc_sections]
    # Tensors shown as: name, shape, dtype, bytes, first values.
    tensors = re.findall(r"^  .+ \(\d+(?:, \d+)*,?\)\s+(?:float32|uint8|int64)\s+[\d.]+ (?:B|KiB|MiB)  \[", printed, flags=re.M)
    assert len(tensors) >= 20


def defined(path: Path, dotted: str) -> bool:
    """Whether `dotted` (Name or Class.method) is defined at the top level of the Python file `path`."""
    scope = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        nodes = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if not nodes:
            return False
        scope = nodes[0].body
    return True


def test_every_code_reference_names_a_real_function(run):
    _, printed = run
    references = set(REFERENCE.findall(DOC.read_text())) | set(REFERENCE.findall(printed))
    assert len(references) > 20
    missing = [f"{file}:{name}" for file, name in sorted(references)
               if not (ROOT / file).is_file() or not defined(ROOT / file, name)]
    assert not missing, f"docs/qlora.md or the walkthrough point to what does not exist: {missing}"


def test_walkthrough_variants_hold_their_equations(run):
    """§4's variants: DoRA starts as its base and computes its eq. 5; PiSSA and OLoRA lose to NF4 no
    more than plain QLoRA; LoftQ less, and less again as its iterations rise."""
    facts, _ = run
    assert facts["dora"]["at init"] < 1e-5 and facts["dora"]["eq. 5"] < 1e-5
    e = facts["init errors"]
    assert e["LoftQ T=5"] < e["LoftQ T=2"] < e["LoftQ T=1"] < e["QLoRA"]
    assert e["PiSSA"] < e["QLoRA"] and e["OLoRA"] <= 1.01 * e["QLoRA"]
