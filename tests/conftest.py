"""Shared fixtures: a tiny random PaliGemma saved like a hub checkpoint, and a tiny imagefolder dataset."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Trackio reads TRACKIO_DIR once, when it is first imported, by whichever test that is: set here,
# before any test runs, its database is this session's and not the user's ~/.cache (where a run of
# an earlier session, of the same name, would be found again).
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="minivlm-tests-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

from demo.make_data import write_split  # noqa: E402
from demo.pretrain_base import make_model, make_processor  # noqa: E402
from minivlm.config import from_dict  # noqa: E402


@pytest.fixture(autouse=True)
def no_bad_rows_from_other_tests():
    """The process's record of skipped bad rows (data._skipped) starts empty in each test: the
    warnings carry its running count, which another test's bad rows would otherwise shift."""
    from minivlm import data
    data._skipped.clear()


def save_paligemma(out: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A random-weight PaliGemma (SigLIP + Gemma, real classes) and its processor, save_pretrained to `out`."""
    torch.manual_seed(0)
    processor = make_processor()
    make_model(processor, hidden=hidden, layers=layers).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_paligemma(tmp_path_factory) -> Path:
    return save_paligemma(tmp_path_factory.mktemp("tiny-paligemma"))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes-qa")
    write_split(out / "train", 24, seed=1)
    write_split(out / "test", 8, seed=2)
    return out


def tiny_config(model_dir: Path, data_dir: Path, output_dir: Path, family: str = "paligemma",
                **train) -> "Config":  # noqa: F821
    """A CPU config for the tiny model; `train` overrides [train] keys."""
    return from_dict({
        "model": {"family": family, "name_or_path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"dataset": str(data_dir), "eval_split": "test", "max_length": 64},
        "train": {"output_dir": str(output_dir), "batch_size": 4, "grad_accum": 1, "lr": 1e-3,
                  "optimizer": "adamw", "device": "cpu", "max_new_tokens": 4, **train},
    })


@pytest.fixture(scope="session")
def tiny_idefics2(tmp_path_factory) -> Path:
    from tiny import save_tiny_idefics2
    return save_tiny_idefics2(tmp_path_factory.mktemp("tiny-idefics2"))


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory) -> Path:
    from tiny import save_tiny_smolvlm
    return save_tiny_smolvlm(tmp_path_factory.mktemp("tiny-smolvlm"))


@pytest.fixture(scope="session")
def tiny_idefics(tmp_path_factory) -> Path:
    from tiny import save_tiny_idefics
    return save_tiny_idefics(tmp_path_factory.mktemp("tiny-idefics"))


@pytest.fixture(scope="session")
def tiny_llava_phi2(tmp_path_factory) -> Path:
    """A LLaVA-Phi model assembled, like the real one, from a separate Phi and CLIP checkpoint."""
    from tiny import save_tiny_phi_and_clip
    from minivlm.models.llava_phi2 import assemble
    root = tmp_path_factory.mktemp("tiny-llava-phi2")
    phi, clip = save_tiny_phi_and_clip(root)
    return assemble(str(phi), str(clip), root / "assembled")


def saved_for_backward(model: torch.nn.Module, forward_backward) -> int:
    """Bytes of the tensors autograd keeps while `forward_backward()` runs: counted by a
    saved-tensors hook, the model's parameters and buffers excluded, shared storage once."""
    model.train()
    frozen = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in frozen:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_backward()
    return sum(saved.values())


class Crash(Exception):
    pass


def crash_after_first_save(monkeypatch, run) -> None:
    """Call `run()` with loop.save_checkpoint raising Crash right after its first save: a run
    killed mid-way, whose last save is what a resume starts from."""
    from minivlm import loop
    real_save = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)


def count_steps(monkeypatch, module) -> list:
    """Count the optimizer steps a run trains: `module.backward_window` (loop's, or dpo's for DPO)
    appends to the list returned each time it runs, once per step. A resumed run must train only
    the steps after its save: one that restarted from 0 would end bit-identical too (it is
    deterministic), having silently thrown the save away."""
    calls, real = [], module.backward_window
    monkeypatch.setattr(module, "backward_window", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def tiny_fixture(name: str, builder: str, *args, **kwargs):
    """A session fixture `tiny_<name>`: tests/tiny.py's `builder` saving its model in a temp dir."""
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory) -> Path:
        import tiny
        return getattr(tiny, builder)(tmp_path_factory.mktemp(f"tiny-{name}"), *args, **kwargs)
    return fixture


# Today's families (tests/tiny.py's ARCHITECTURES), each through every check of test_architectures.py.
tiny_qwen2_5_vl = tiny_fixture("qwen2_5_vl", "save_tiny_qwen", "2_5")
tiny_qwen2_vl = tiny_fixture("qwen2_vl", "save_tiny_qwen", "2")
tiny_qwen3_vl = tiny_fixture("qwen3_vl", "save_tiny_qwen3_vl")
tiny_gemma3 = tiny_fixture("gemma3", "save_tiny_gemma3")
tiny_smolvlm2 = tiny_fixture("smolvlm2", "save_tiny_smolvlm", version="2")
tiny_llava_onevision = tiny_fixture("llava_onevision", "save_tiny_llava_onevision")
tiny_internvl = tiny_fixture("internvl", "save_tiny_internvl")
tiny_mistral3 = tiny_fixture("mistral3", "save_tiny_mistral3")
tiny_mllama = tiny_fixture("mllama", "save_tiny_mllama")


def write_pair_rows(folder: Path, n: int = 4) -> Path:
    """A JSON Lines file of `n` two-image rows (ShareGPT's `images` list, each image placed by an
    <image> marker in the question): which of the two holds the red shape, left or right, as
    answer (chosen) and its opposite (rejected), for SFT, DPO and GRPO alike; in words the tiny
    test tokenizers know."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        red = i % 2
        names = []
        for k in range(2):
            name = f"{i}_{k}.png"
            Image.new("RGB", (32 + 8 * k, 32), (220, 40, 40) if k == red else (40, 40, 220)).save(folder / name)
            names.append(name)
        rows.append({"images": names, "question": "which is red, left <image> or right <image>",
                     "answer": ["left", "right"][red], "rejected": ["right", "left"][red]})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def random_b(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Every LoRA B drawn at random: at its zero start every A's gradient is zero (a gradient test
    that could not fail) and the adapters change nothing (a generation test that could not either)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, std)


def weighted_log_probs_and_grads(cfg, built, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The answer tokens' log-probabilities (logprobs.answer_log_probs) and every gradient of their
    weighted sum: each token weighs differently, so tokens or rows mixed up would show."""
    from minivlm.batches import answer_positions, answer_targets
    from minivlm.logprobs import answer_log_probs

    built.model.zero_grad()
    logp = answer_log_probs(cfg, built, batch, answer_positions(batch), answer_targets(batch))
    (logp * torch.linspace(0.5, 1.5, len(logp))).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in built.model.named_parameters() if p.grad is not None}
