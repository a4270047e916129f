"""minivlm/logprobs.py: the answer tokens' log-probabilities, a chunk of lm_head rows at a time,
equal in value and gradient to the full logits' for every family, with no more than a chunk of
vocabulary-sized rows ever alive."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import random_b, tiny_config, weighted_log_probs_and_grads
from minivlm.batches import answer_positions
from minivlm.build import build
from minivlm.logprobs import log_probs
from tiny import ARCHITECTURES

FAMILIES = ["paligemma", "idefics2", "smolvlm", "idefics", "llava_phi2", *ARCHITECTURES]


def test_log_probs_are_the_log_softmax_of_the_chosen_ids():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    want = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(log_probs(logits, ids), want)


def built_and_batch(path, tmp_path, family: str):
    """The tiny model with LoRA, its B matrices random (at their zero start every A's gradient is
    zero: a gradient test that could not fail), and a two-sample training batch."""
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=family)
    built = build(cfg)
    random_b(built.model)
    images = [[Image.new("RGB", (32, 32), (200, 40, 40))], [Image.new("RGB", (40, 32), (40, 40, 200))]]
    batch = built.family.training_batch(built.processor, images, [[("what color is the shape", "red")],
                                                                  [("where is it", "top left")]])
    return cfg, built, batch


def log_probs_and_grads(cfg, built, batch: dict, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg.train.logits_chunk = chunk
    return weighted_log_probs_and_grads(cfg, built, batch)


def assert_chunks_equal_full(cfg, built, batch) -> None:
    full, full_grads = log_probs_and_grads(cfg, built, batch, 0)
    assert len(full) > 3 and full_grads
    for chunk in (1, 3, 1000):  # a row a chunk; chunks and a remainder; every row in one chunk
        chunked, grads = log_probs_and_grads(cfg, built, batch, chunk)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
        assert grads.keys() == full_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_give_the_full_logits_values_and_gradients(family, request, tmp_path):
    cfg, built, batch = built_and_batch(request.getfixturevalue(f"tiny_{family}"), tmp_path, family)
    assert_chunks_equal_full(cfg, built, batch)
    assert not any(type(m).__name__ == "HiddenTap" for m in built.model.modules())  # the lm_head is back


def test_a_softcapped_model_is_capped_in_the_chunks_too(tiny_paligemma, tmp_path):
    """PaliGemma 2 (Gemma 2) caps its logits, cap · tanh(z / cap), after the lm_head: the chunks,
    which run the lm_head themselves, must too. A cap of 0.02 (the tiny random model's logits are small) changes the log-probabilities."""
    cfg, built, batch = built_and_batch(tiny_paligemma, tmp_path, "paligemma")
    uncapped, _ = log_probs_and_grads(cfg, built, batch, 0)
    built.model.config.text_config.final_logit_softcapping = 0.02
    capped, _ = log_probs_and_grads(cfg, built, batch, 0)
    assert (capped - uncapped).abs().max() > 0.1
    assert_chunks_equal_full(cfg, built, batch)


class VocabRows(TorchDispatchMode):
    """The most rows of any vocabulary-wide tensor (last dimension V) that an op returned, views
    of the model's weights (the lm_head's, transposed for its matmul) aside."""

    def __init__(self, vocab: int, model: torch.nn.Module):
        super().__init__()
        self.vocab, self.most = vocab, 0
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in self.weights):
                self.most = max(self.most, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("chunk", [0, 2])
def test_no_more_than_a_chunk_of_vocabulary_rows_exists_and_none_is_kept(chunk, tiny_paligemma, tmp_path):
    """Made by any op, forward or backward: at most a chunk of vocabulary-wide rows. Kept for
    backward (a saved-tensors hook): none, where full logits keep all n."""
    cfg, built, batch = built_and_batch(tiny_paligemma, tmp_path, "paligemma")
    vocab = built.model.get_output_embeddings().weight.shape[0]
    n = int(answer_positions(batch).sum())
    rows, kept = VocabRows(vocab, built.model), {}

    def pack(t):
        if t.dim() and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in rows.weights:
            kept[t.untyped_storage().data_ptr()] = t.numel() // vocab
        return t
    with rows, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        log_probs_and_grads(cfg, built, batch, chunk)
    assert rows.most == (chunk or n) and n > 2
    assert sum(kept.values()) == (0 if chunk else n)
