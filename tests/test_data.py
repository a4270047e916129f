"""Data: templates over columns, images from anywhere as RGB, the crop augmentation, batching."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from PIL import Image

from minivlm.config import ConfigError, DataConfig
from conftest import tiny_config
from minivlm.batches import collate, random_resized_crop
from minivlm.data import answer_of, load_split, prompt_of, required_columns, rows_of, to_rgb
from minivlm.steps import (GROUP, StreamSteps, TrainSteps, epoch_batches, epoch_generator, grouped_batches,
                           steps_per_epoch, train_loader)
from minivlm.models import paligemma


def test_templates_read_any_column():
    cfg = DataConfig(question_column="q", answer_column="caption", prompt_template="Question: {q}? Answer:",
                     answer_template="This is {name}. {answer}")
    row = {"q": "who", "caption": ["A card", "other"], "name": "Pikachu"}
    assert prompt_of(cfg, row) == "Question: who? Answer:"
    assert answer_of(cfg, row) == "This is Pikachu. A card"  # a list answer: its first entry
    assert required_columns(cfg) == ["image", "caption", "name", "q"]


def test_missing_template_column_is_named(shapes_data):
    cfg = DataConfig(dataset=str(shapes_data), answer_template="This is {name}.")
    with pytest.raises(ConfigError, match=r"no column\(s\) \['name'\]"):
        load_split(cfg, "train")


def test_to_rgb_composites_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 255)
    path = tmp_path / "p.png"
    rgba.save(path)
    assert to_rgb(str(path)).getpixel((1, 1)) == (255, 255, 255)  # a path loads too


def test_to_rgb_turns_photos_upright_and_reads_animations_and_cmyk(tmp_path):
    """An EXIF-rotated photo comes out as a viewer shows it; an animated GIF as its first frame;
    a CMYK JPEG with an ICC profile in its colours."""
    from PIL import ImageCms
    # Stored 4 wide × 2 high, red on the left; orientation 6: shown turned 90° clockwise.
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright = to_rgb(str(tmp_path / "rotated.jpg"))
    assert upright.size == (2, 4)  # 2 wide × 4 high
    top, bottom = upright.getpixel((0, 0)), upright.getpixel((0, 3))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # the stored left (red) is now on top

    frames = [Image.new("RGB", (4, 4), c) for c in [(0, 200, 0), (200, 0, 0), (0, 0, 200)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = to_rgb(str(tmp_path / "anim.gif"))
    assert first.mode == "RGB" and first.getpixel((1, 1)) == (0, 200, 0)

    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk.save(tmp_path / "cmyk.jpg", icc_profile=srgb, quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as opened:
        assert opened.mode == "CMYK" and opened.info.get("icc_profile")
    r, g, b = to_rgb(str(tmp_path / "cmyk.jpg")).getpixel((4, 4))
    assert r < 30 and g > 225 and b > 225


def test_random_resized_crop_scale_and_determinism():
    image = Image.new("RGB", (100, 80))
    g = torch.Generator().manual_seed(0)
    crops = [random_resized_crop(image, [0.5, 0.6], g) for _ in range(50)]
    areas = [c.size[0] * c.size[1] / (100 * 80) for c in crops]
    assert all(0.47 <= a <= 0.63 for a in areas)  # rounding to whole pixels
    assert len({c.size for c in crops}) > 5
    g = torch.Generator().manual_seed(0)
    assert [random_resized_crop(image, [0.5, 0.6], g).size for _ in range(50)] == [c.size for c in crops]


def test_epoch_batches_cover_every_sample_once_and_reshuffle():
    first = epoch_batches(10, 3, seed=0, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(10)) and [len(b) for b in first] == [3, 3, 3, 1]
    assert first == epoch_batches(10, 3, seed=0, epoch=0)
    assert first != epoch_batches(10, 3, seed=0, epoch=1)
    assert steps_per_epoch(10, 3, 2) == 2


def padded_share(batches: list[list[int]], lengths: list[int]) -> float:
    """The share of a padded batch's positions that are padding, over an epoch's `batches`."""
    return 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_grouped_batches_hold_alike_lengths_and_are_an_epoch_of_their_own_seed():
    lengths = torch.randint(10, 500, (1003,), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = grouped_batches(lengths, 4, seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(1003))  # every sample once
    assert [len(b) for b in grouped] == [4] * 250 + [3]  # the short batch still last
    assert grouped == grouped_batches(lengths, 4, seed=0, epoch=0)  # a function of (seed, epoch): exact resume
    assert grouped != grouped_batches(lengths, 4, seed=0, epoch=1) != grouped_batches(lengths, 4, seed=1, epoch=0)
    # the longest sample's batch first: a run that runs out of memory does so at step 1
    assert max(lengths[i] for i in grouped[0]) == max(lengths)
    plain = epoch_batches(1003, 4, seed=0, epoch=0)
    assert padded_share(grouped, lengths) < 0.02 < 0.3 < padded_share(plain, lengths)
    # alike lengths come from within a group of GROUP batches of the epoch's shuffle, not the whole
    # split sorted: the shortest and longest samples do not always share a step with their likes
    order = torch.randperm(1003, generator=epoch_generator(0, 0)).tolist()  # the epoch's shuffle
    groups = [set(order[s:s + 4 * GROUP]) for s in range(0, 1003, 4 * GROUP)]
    assert all(any(set(b) <= g for g in groups) for b in grouped)
    # and the batches' order is shuffled: not one group after another, longest to shortest
    assert sum(max(lengths[i] for i in a) > max(lengths[i] for i in b) for a, b in zip(grouped, grouped[1:])) < 200


def test_grouped_steps_split_over_ranks_as_one_process_batch(tmp_path):
    """Under torchrun every rank orders the epoch alike from the same lengths, and rank r collates
    the r-th slice of each micro-batch: 2 ranks × batch 2 train on one process's batches of 4."""
    lengths = [(7 * i) % 23 for i in range(40)]
    cfg = DataConfig()

    def take(ds, idx, *rest):
        return {"idx": idx}
    ranks = [TrainSteps(list(range(40)), cfg, "paligemma", None, 2, 1, 0, 0, 10, 2, r, take, 1, lengths)
             for r in range(2)]
    one = grouped_batches(lengths, 4, 0, 0)
    for k in range(10):
        a, b = ranks[0][k], ranks[1][k]
        assert a.window == b.window == [one[k]]
        assert a.batches[0]["idx"] + b.batches[0]["idx"] == one[k]


def test_group_by_length_measures_lengths_or_reads_a_column(tiny_paligemma, shapes_data, tmp_path):
    from minivlm.steps import sample_lengths
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    processor = paligemma.load_processor(str(tiny_paligemma))
    ds = load_split(cfg.data, "train")
    measured = sample_lengths(ds, cfg.data, "paligemma", processor)
    assert measured == [int(collate(ds, [i], cfg.data, paligemma, processor)["attention_mask"].sum()) for i in range(len(ds))]
    assert len(set(measured)) > 1  # answers of different lengths
    cfg.data.length_column = "answer"
    with pytest.raises(ConfigError, match="not a column"):
        sample_lengths(ds.remove_columns("answer"), cfg.data, "paligemma", processor)
    numbered = ds.add_column("n", list(range(len(ds), 0, -1)))
    cfg.data.length_column = "n"
    assert sample_lengths(numbered, cfg.data, "paligemma", processor) == list(range(len(ds), 0, -1))


def test_answers_the_tokenizer_cannot_spell_are_counted_and_shown(tiny_idefics2, tiny_paligemma, tmp_path):
    import json

    from tokenizers import Tokenizer, models
    from transformers import AutoProcessor, PreTrainedTokenizerFast

    from minivlm.data import warn_unknown_answers

    data = tmp_path / "digits" / "train"
    data.mkdir(parents=True)
    answers = ["red", "7", "top left", "42 circle"]
    for i, a in enumerate(answers):
        Image.new("RGB", (8, 8)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "question": "what",
                                                             "answer": a}) + "\n" for i, a in enumerate(answers)))
    cfg = DataConfig(dataset=str(data.parent))
    ds = load_split(cfg, "train")
    word_level = AutoProcessor.from_pretrained(tiny_idefics2).tokenizer  # knows the shape words, no digit
    with pytest.warns(UserWarning, match=r"2 of the first 4 answers .*row 1: '7' -> \['<unk>'\]; row 3: '42 circle'"):
        assert warn_unknown_answers(ds, cfg, word_level) == 2
    # A tokenizer without an unknown token silently drops what it cannot spell: caught too.
    letters = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}, merges=[]))
    with pytest.warns(UserWarning, match=r"2 of the first 4 answers .*becomes nothing.*row 1: '7' -> \[\]"):
        assert warn_unknown_answers(ds, cfg, PreTrainedTokenizerFast(tokenizer_object=letters)) == 2
    byte_level = AutoProcessor.from_pretrained(tiny_paligemma).tokenizer  # the embedded base's: spells anything
    assert warn_unknown_answers(ds, cfg, byte_level) == 0
    # Preference data: a rejected answer it cannot spell is caught too (row 0: 'red' chosen, '9' rejected).
    rejected = tmp_path / "prefs" / "train"
    rejected.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(rejected / "0.png")
    (rejected / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "question": "what", "answer": "red",
                                                         "rejected": "9"}) + "\n")
    prefs = DataConfig(dataset=str(rejected.parent), rejected_column="rejected")
    with pytest.warns(UserWarning, match=r"1 of the first 1 answers .*row 0: '9' -> \['<unk>'\]"):
        assert warn_unknown_answers(load_split(prefs, "train"), prefs, word_level) == 1
    assert byte_level.decode(byte_level("42 café")["input_ids"], skip_special_tokens=True).strip() == "42 café"


def test_train_loader_gives_the_same_steps_with_workers_and_from_a_resumed_step(tiny_paligemma, shapes_data,
                                                                             tmp_path):
    """Workers prepare steps in other processes: the steps, their samples and their random crops
    must not depend on how many there are, nor on where a (resumed) run starts."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.data.random_resized_crop = [0.3, 0.5]
    processor = paligemma.load_processor(str(tiny_paligemma))
    ds = load_split(cfg.data, "train")  # 24 samples, batch 2 x accum 2: 6 steps an epoch

    def steps(workers: int, first: int) -> list:
        cfg.data.workers = workers
        return list(train_loader(ds, cfg.data, "paligemma", processor, 2, 2, 0, first, 9))

    inline, parallel, resumed = steps(0, 0), steps(2, 0), steps(0, 4)
    assert [s.number for s in inline] == list(range(9))
    assert [s.epoch for s in inline] == [0] * 6 + [1] * 3
    assert [s.window for s in inline[:6]] == [epoch_batches(24, 2, 0, 0)[2 * k:2 * k + 2] for k in range(6)]
    for a, b in [*zip(inline, parallel), *zip(inline[4:], resumed)]:
        assert (a.number, a.window) == (b.number, b.window)
        for x, y in zip(a.batches, b.batches):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # The crops are really drawn (the batches above are cropped), and only in training: a batch
    # collated without a generator (validation) keeps whole images.
    uncropped = collate(ds, inline[0].window[0], cfg.data, paligemma, processor)
    assert not torch.equal(uncropped["pixel_values"], inline[0].batches[0]["pixel_values"])


def same_steps(a: list, b: list) -> None:
    assert [(s.number, s.epoch, s.window, s.resume_at) for s in a] == [(s.number, s.epoch, s.window, s.resume_at) for s in b]
    for x, y in zip(a, b):
        for p, q in zip(x.batches, y.batches):
            assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)


def test_a_stream_is_read_epoch_after_epoch_reshuffled_and_resumes_where_it_was(tiny_paligemma, shapes_data,
                                                                             tmp_path):
    """data.streaming: every row once an epoch, each epoch in a new order, a step running on into
    the next epoch; the same steps with workers, and from a save's position as from the start."""
    cfg = tiny_config(tiny_paligemma, shapes_data, tmp_path)
    cfg.data.streaming, cfg.data.shuffle_buffer, cfg.data.random_resized_crop = True, 8, [0.3, 0.5]
    processor = paligemma.load_processor(str(tiny_paligemma))
    stream = load_split(cfg.data, "train", streaming=True)
    in_file = [row["image"]["path"] for row in rows_of(load_split(cfg.data, "train"), list(range(24)))]

    read = list(itertools.islice(StreamSteps(stream, cfg.data, "paligemma", processor, 5, 1, 0, 0, 1)._rows(), 48))
    assert [where for where, _ in read] == [{"epoch": e, "row": r, "read": 24 * e + r} for e in (0, 1) for r in range(24)]
    epochs = [[row["image"] for where, row in read if where["epoch"] == e] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(in_file)
    assert len({tuple(epochs[0]), tuple(epochs[1]), tuple(in_file)}) == 3  # shuffled, and anew each epoch

    def steps(workers: int, first: int, resume_at: dict | None = None) -> list:
        cfg.data.workers = workers  # 5 rows a step: the fifth runs from epoch 0 into epoch 1
        return list(train_loader(stream, cfg.data, "paligemma", processor, 5, 1, 0, first, 9, resume_at=resume_at))

    inline = steps(0, 0)
    assert [s.epoch for s in inline] == [0] * 5 + [1] * 4
    assert inline[4].window == [[20, 21, 22, 23, 24]] and inline[4].resume_at == {"epoch": 1, "row": 1, "read": 25}
    same_steps(inline, steps(2, 0))
    same_steps(inline[5:], steps(0, 5, inline[4].resume_at))


def conversation_layouts(a: str, b: str) -> dict[str, dict]:
    """One two-image, two-exchange sample (an image in each user turn) in the layouts datasets
    come in: TRL's and HF's chat messages, LLaVA's JSON, ShareGPT's (LLaMA-Factory) messages."""
    return {
        "hf": {"images": [a, b], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
            {"role": "user", "content": [{"type": "text", "text": "and this one"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a blue square"}]}]},
        "llava": {"image": [a, b], "conversations": [
            {"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "and this one <image>"}, {"from": "gpt", "value": "a blue square"}]},
        "sharegpt": {"images": [a, b], "messages": [
            {"role": "user", "content": "<image>what is it"}, {"role": "assistant", "content": "a red circle"},
            {"role": "user", "content": "and this one<image>"}, {"role": "assistant", "content": "a blue square"}]},
    }


def layout_config(path, name: str, **kw) -> DataConfig:
    image_column = "image" if name == "llava" else "images"
    conversations = "conversations" if name == "llava" else "messages"
    return DataConfig(dataset=str(path), image_column=image_column, conversations_column=conversations,
                      image_root=str(path.parent), max_images=2, **kw)


def test_every_conversation_layout_gives_the_same_tensors(tiny_qwen2_5_vl, tmp_path):
    import datasets as hf_datasets
    from minivlm.models import qwen2_5_vl

    processor = qwen2_5_vl.load_processor(str(tiny_qwen2_5_vl))
    pictures = [Image.new("RGB", (48, 32), (220, 40, 40)), Image.new("RGB", (32, 64), (50, 80, 220))]
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"{i}.png")
    batches = {}
    for name, row in conversation_layouts("0.png", "1.png").items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        cfg = layout_config(path, name)
        batches[name] = collate(load_split(cfg, "train"), [0], cfg, qwen2_5_vl, processor)
    # TRL's own: the images themselves in a `datasets` column, beside the same messages.
    in_memory = hf_datasets.Dataset.from_list([{**conversation_layouts("", "")["hf"], "images": pictures}])
    batches["in memory"] = collate(in_memory, [0], layout_config(tmp_path / "hf.jsonl", "hf"), qwen2_5_vl, processor)
    first = batches.pop("hf")
    assert first["image_grid_thw"].shape[0] == 2 and (first["labels"] != -100).any()
    for name, batch in batches.items():
        assert batch.keys() == first.keys(), name
        assert all(torch.equal(batch[k], first[k]) for k in first), name


def test_a_corrupt_second_image_skips_its_row_counted(tiny_qwen2_5_vl, tmp_path):
    from minivlm.data import skipped_count
    from minivlm.models import qwen2_5_vl

    processor = qwen2_5_vl.load_processor(str(tiny_qwen2_5_vl))
    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [conversation_layouts("good.png", second)["llava"] for second in ("good.png", "bad.png", "good.png")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = layout_config(path, "llava")
    before = skipped_count()
    with pytest.warns(UserWarning, match=r"skipped row 1 of split 'train': image .*bad.png cannot be read: .* "
                                         r"\(image 2 of 2\) \(\d+ bad row\(s\) skipped so far"):
        batch = collate(load_split(cfg, "train"), [0, 1, 2], cfg, qwen2_5_vl, processor)
    assert skipped_count() == before + 1
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 4  # two rows, two images each


def test_markers_must_match_the_images(tmp_path):
    from minivlm.data import BadSample, sample_of

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    cfg = DataConfig(dataset="x", image_column="images", image_root=str(tmp_path), max_images=2)
    with pytest.raises(BadSample, match=r"markers <image> do not match its media <image> <image>"):
        sample_of(cfg, {"images": ["a.png", "a.png"], "question": "<image> what", "answer": "a"})
    with pytest.raises(BadSample, match="an answer holds an <image> or <video> marker"):
        sample_of(cfg, {"images": ["a.png"], "question": "what", "answer": "<image>"})
    images, dialog = sample_of(cfg, {"images": ["a.png", "a.png"], "question": "what", "answer": "a"})
    assert len(images) == 2 and dialog == [("what", "a")]  # no markers: both go first
    with pytest.raises(BadSample, match="an empty list"):
        sample_of(cfg, {"images": [], "question": "what", "answer": "a"})


def test_more_images_than_max_images_drop_the_sample_with_the_key_to_raise(tiny_qwen2_5_vl, tmp_path):
    from minivlm.models import qwen2_5_vl

    processor = qwen2_5_vl.load_processor(str(tiny_qwen2_5_vl))
    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "a.png")
    rows = [{"images": ["a.png"] * n, "question": "what", "answer": "red"} for n in (1, 3, 2)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(dataset=str(path), image_column="images", image_root=str(tmp_path), max_images=2)
    with pytest.warns(UserWarning, match=r"dropped sample\(s\) 1 \(3 images\): more than data.max_images = 2; raise it"):
        batch = collate(load_split(cfg, "train"), [0, 1, 2], cfg, qwen2_5_vl, processor)
    assert batch["image_grid_thw"].shape[0] == 3  # rows 0 and 2: one image and two


def test_each_image_of_a_sample_is_cropped_by_the_same_policy(tmp_path):
    from minivlm.batches import samples
    from minivlm.models import qwen2_5_vl

    for i in range(2):
        Image.new("RGB", (64, 48), (200, 60 * i, 0)).save(tmp_path / f"{i}.png")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"images": ["0.png", "1.png"], "question": "what", "answer": "red"}) + "\n")
    cfg = DataConfig(dataset=str(path), image_column="images", image_root=str(tmp_path), max_images=2,
                     random_resized_crop=[0.3, 0.5])
    ds = load_split(cfg, "train")
    (_, _, images, _), = samples(ds, [0], cfg, qwen2_5_vl, torch.Generator().manual_seed(0))
    areas = [im.size[0] * im.size[1] / (64 * 48) for im in images]
    assert all(0.25 <= a <= 0.55 for a in areas), areas  # each cropped, within the scale (rounding aside)
    assert images[0].size != images[1].size or images[0].getpixel((0, 0)) != images[1].getpixel((0, 0))
    (_, _, uncropped, _), = samples(ds, [0], cfg, qwen2_5_vl)  # validation: no generator, no crop
    assert [im.size for im in uncropped] == [(64, 48)] * 2
