"""Video: frames sampled from a file (PyAV) or a list as configured, the torchvision-free video
processors (Qwen-VL's against transformers' own patch layout and resize, LLaVA-OneVision's against its
image processor, SmolVLM2's frames held to one count), the label mask around video tokens and the
planner's count in every family that reads video, and infer.py --video."""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.batches import collate
from minivlm.config import ConfigError, DataConfig
from minivlm.data import load_split, video_of
from minivlm.models import chat, get_family, qwen2_5_vl
from test_architectures import labelled_spans

# The families that read video, and the token each video frame's features take in the text.
VIDEO_TOKEN = {"qwen2_5_vl": "<|video_pad|>", "qwen2_vl": "<|video_pad|>", "qwen3_vl": "<|video_pad|>",
               "llava_onevision": "<video>", "smolvlm2": "<image>"}
# Small frames for the tiny Qwen towers (4 px patches); the others have no video resolution to set.
# Qwen3-VL's bounds are the clip's, frames × height × width.
VIDEO_RESOLUTION = {"qwen2_5_vl": {"min_pixels": 64, "max_pixels": 32 * 32},
                    "qwen2_vl": {"min_pixels": 64, "max_pixels": 32 * 32},
                    "qwen3_vl": {"min_pixels": 64, "max_pixels": 4 * 32 * 32}}


def frame(i: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Frame i of a test video: its index in its brightness, so a sampled frame says which it was."""
    return Image.new("RGB", size, (12 * i, 12 * i, 12 * i))


def write_video(path, frames: int, fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_image(frame(i))))
        container.mux(stream.encode())


def index_of(image: Image.Image) -> int:
    return round(np.asarray(image, dtype=np.float64).mean() / 12)


def test_frames_are_sampled_as_configured_from_a_file_and_from_a_list(tmp_path):
    write_video(tmp_path / "clip.mp4", frames=20, fps=10)  # 2 seconds
    cfg = DataConfig(dataset="x", video_column="video", image_root=str(tmp_path), video_frames=4)
    video = video_of(cfg, {"video": "clip.mp4"})
    assert [index_of(f) for f in video.frames] == [0, 5, 10, 15] and video.fps == pytest.approx(2.0)
    by_rate = video_of(DataConfig(dataset="x", video_column="video", image_root=str(tmp_path), video_frames=8,
                                  video_fps=1.5), {"video": "clip.mp4"})
    assert [index_of(f) for f in by_rate.frames] == [0, 6, 13] and by_rate.fps == pytest.approx(1.5)
    listed = video_of(DataConfig(dataset="x", video_column="video", video_frames=3, video_fps=6),
                      {"video": [frame(i) for i in range(6)]})
    assert [index_of(f) for f in listed.frames] == [0, 2, 4] and listed.fps == pytest.approx(3.0)


def test_an_unreadable_video_is_a_bad_sample_naming_it(tmp_path):
    from minivlm.data import BadSample
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(BadSample, match=r"video .*broken.mp4 cannot be read"):
        video_of(DataConfig(dataset="x", video_column="video", image_root=str(tmp_path)), {"video": "broken.mp4"})


def patchify(videos, patch_size, merge_size, temporal_patch_size):
    """transformers' Qwen2VLVideoProcessor.patchify (video_processing_qwen2_vl.py, 5.24), verbatim but
    for the return: that module imports torchvision, so its code is copied here as the oracle."""
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    if pad := -num_frames % temporal_patch_size:
        repeats = videos[:, -1:].expand(-1, pad, -1, -1, -1)
        videos = torch.cat((videos, repeats), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = videos.view(batch_size, grid_t, temporal_patch_size, channel, grid_h // merge_size, merge_size,
                          patch_size, grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(batch_size, grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return flat, [grid_t, grid_h, grid_w]


def test_qwen_video_frames_are_laid_out_as_transformers_video_processor_lays_them(tiny_qwen2_5_vl):
    """Three different frames (an odd count: the last repeated), resized and normalized as the image
    processor does, then patchified by transformers' own video code: the same tensor and grid."""
    processor = qwen2_5_vl.load_processor(str(tiny_qwen2_5_vl))
    ip = processor.image_processor
    video = processor.video_processor
    frames = [frame(i * 5, (80, 56)) for i in range(3)]
    video.size = dict(ip.size)  # the video's resolution as the images': the oracle frames are resized so
    resized = []
    for f in frames:
        a = np.asarray(f).transpose(2, 0, 1).astype(np.float32)
        a = ip.resize(a, size=ip.size, resample=ip.resample, factor=ip.patch_size * ip.merge_size)
        resized.append(torch.from_numpy(np.asarray(ip.normalize(ip.rescale(a, ip.rescale_factor), ip.image_mean,
                                                                ip.image_std), dtype=np.float32)))
    expected, grid = patchify(torch.stack(resized)[None], ip.patch_size, ip.merge_size, 2)
    ours = video([frames])
    assert ours["video_grid_thw"].tolist() == [grid] and grid[0] == 2
    torch.testing.assert_close(ours["pixel_values_videos"], expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", VIDEO_TOKEN)
def test_video_and_image_in_one_dialog_label_only_the_answers(name, request):
    """A video in the second turn (after an image in the first, where the family takes both in one
    batch) and a shorter video in the first: each where its marker is, every answer labelled, no
    video token labelled; and the model reads the batch."""
    family = get_family(name)
    path = request.getfixturevalue(f"tiny_{name}")
    processor = family.load_processor(str(path), video_resolution=VIDEO_RESOLUTION.get(name, {}))
    tok = processor.tokenizer
    clip, short = (chat.Video([frame(i) for i in range(n)], fps=2.0) for n in (4, 3))
    beside = getattr(family, "VIDEO_BESIDE_IMAGES", True)
    dialogs = [[("<image> what is it" if beside else "what is it", "a red circle"), ("and in <video>", "top left")],
               [("<video> where", "bottom right")]]
    batch = family.training_batch(processor, [[frame(3), clip] if beside else [clip], [short]], dialogs)
    end = tok.convert_tokens_to_ids(family.END_OF_TURN)
    for row, dialog in enumerate(dialogs):
        assert labelled_spans(batch["labels"][row]) == [tok(a, add_special_tokens=False)["input_ids"] + [end]
                                                        for _, a in dialog]
    video_token = tok.convert_tokens_to_ids(VIDEO_TOKEN[name])
    assert ((batch["input_ids"] == video_token).sum(1) > 0).all()
    assert not (batch["labels"][batch["input_ids"] == video_token] != -100).any()
    first_answer = (batch["labels"][0] != -100).nonzero()[0]
    assert not (batch["input_ids"][0, :first_answer] == video_token).any()  # the video is in turn 2
    if name == "qwen2_5_vl":
        # 4 frames in pairs; 64×48 down to 32×24 (max_pixels 1024), in the tiny model's 4-px patches
        assert batch["video_grid_thw"].tolist() == [[2, 6, 8]] * 2
        assert batch["second_per_grid_ts"].tolist() == [1.0, 1.0]  # 2 frames a grid step at 2 fps
    model = family.MODEL_CLASS.from_pretrained(path)
    assert torch.isfinite(model(**batch).loss)


def test_qwen3_bounds_the_clip_not_each_frame(tiny_qwen3_vl):
    """Four 64×48 frames at max_pixels 4096: 4·48·64 is over it, so each frame shrinks to 24×32
    (4·24·32 = 3072; transformers' smart_resize over the clip), where Qwen2.5-VL's per-frame bound
    would keep 48×64; laid out by transformers' own patchify of the frames at that size."""
    from minivlm.models import qwen3_vl

    processor = qwen3_vl.load_processor(str(tiny_qwen3_vl), video_resolution=VIDEO_RESOLUTION["qwen3_vl"])
    ip = processor.image_processor
    frames = [frame(i * 5) for i in range(4)]
    resized = []
    for f in frames:
        a = np.asarray(f.resize((32, 24), Image.Resampling.BICUBIC)).transpose(2, 0, 1).astype(np.float32)
        resized.append(torch.from_numpy(np.asarray(ip.normalize(ip.rescale(a, ip.rescale_factor), ip.image_mean,
                                                                ip.image_std), dtype=np.float32)))
    expected, grid = patchify(torch.stack(resized)[None], ip.patch_size, ip.merge_size, 2)
    ours = processor.video_processor([frames])
    assert grid == [2, 6, 8] and ours["video_grid_thw"].tolist() == [grid]
    torch.testing.assert_close(ours["pixel_values_videos"], expected[0], rtol=0, atol=1e-6)


def test_onevision_frames_are_the_image_processors_whole_view(tiny_llava_onevision):
    """A LLaVA-OneVision frame is written as its image processor writes an image's whole view (the
    first of its crops): resized to the tower's size, aspect not kept, and normalized the same."""
    from minivlm.models import llava_onevision

    processor = llava_onevision.load_processor(str(tiny_llava_onevision))
    frames = [frame(i * 5, (64, 48)) for i in range(3)]
    ours = processor.video_processor([frames])["pixel_values_videos"]
    assert ours.shape == (1, 3, 3, 32, 32)
    for i, f in enumerate(frames):
        whole = processor.image_processor(images=[f], return_tensors="pt")["pixel_values"][0][0]
        torch.testing.assert_close(ours[0, i], whole, rtol=0, atol=1e-6)


def test_smolvlm2_holds_a_short_videos_last_frame_and_refuses_images_beside_video(tiny_smolvlm2):
    """One tensor for a batch's videos: the 3-frame one holds its last frame (pixels and timestamp),
    so its prompt and its pixels count the same frames. Its processor keeps one of images and
    videos (both are pixel_values): a batch of both is refused in one line."""
    from minivlm.batches import check_samples
    from minivlm.models import smolvlm2

    processor = smolvlm2.load_processor(str(tiny_smolvlm2))
    videos = [[frame(i) for i in range(n)] for n in (4, 3)]
    metadata = chat.processor_media([[chat.Video(v, fps=2.0)] for v in videos])["video_metadata"]
    out = processor.video_processor(videos, video_metadata=metadata)
    assert out["pixel_values"].shape == (2, 4, 3, 32, 32) and out["pixel_attention_mask"].all()
    torch.testing.assert_close(out["pixel_values"][1, 3], out["pixel_values"][1, 2], rtol=0, atol=0)
    assert not torch.equal(out["pixel_values"][1, 2], out["pixel_values"][1, 1])
    assert [list(m.frames_indices) for m in out["video_metadata"]] == [[0, 1, 2, 3], [0, 1, 2, 2]]
    clip = chat.Video(videos[0], fps=2.0)
    check_samples(smolvlm2, [[clip], [clip]], [[("x", "y")]] * 2, "")
    with pytest.raises(ConfigError, match=r"^SmolVLM2's processor takes a batch's images or its videos, not both"):
        check_samples(smolvlm2, [[frame(0)], [clip]], [[("x", "y")]] * 2, "")


def test_a_video_dataset_collates_and_a_family_without_video_refuses_it(tiny_qwen2_5_vl, tiny_paligemma, tmp_path):
    from conftest import tiny_config
    from minivlm.build import load_processor

    write_video(tmp_path / "clip.mp4", frames=12, fps=6)
    rows = [{"video": "clip.mp4", "question": "<video> where is it", "answer": "top left"},
            {"video": "missing.mp4", "question": "where", "answer": "top"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny_qwen2_5_vl, tmp_path / "rows.jsonl", tmp_path / "run", family="qwen2_5_vl")
    cfg.data.video_column, cfg.data.image_root, cfg.data.video_frames, cfg.data.eval_split = "video", str(tmp_path), 6, ""
    cfg.model.video_processor = {"min_pixels": 64, "max_pixels": 32 * 32}
    processor = load_processor(cfg)
    with pytest.warns(UserWarning, match=r"skipped row 1 .* video .*missing.mp4 cannot be read"):
        batch = collate(load_split(cfg.data, "train"), [0, 1], cfg.data, qwen2_5_vl, processor)
    assert batch["input_ids"].shape[0] == 1 and batch["video_grid_thw"].tolist() == [[3, 6, 8]]
    cfg.model.video_processor = {"max_pixel": 1}
    with pytest.raises(ConfigError, match="model.video_processor: Qwen2.5-VL's has no max_pixel; its resolution "
                                          "controls are min_pixels, max_pixels"):
        load_processor(cfg)
    other = tiny_config(tiny_paligemma, tmp_path / "rows.jsonl", tmp_path / "run")
    other.data.video_column = "video"
    with pytest.raises(ConfigError, match=r"PaliGemma reads no video here .*video needs one of qwen2_5_vl, qwen2_vl"):
        load_processor(other)


@pytest.mark.parametrize("name", VIDEO_TOKEN)
def test_the_plan_counts_the_video_tokens_the_processor_makes(name, request, tmp_path):
    """--dry-run with data.video_column: data.video_frames frames (5: an odd count) at the video's
    largest frame, counted as the processor counts them (a video at that size, through the real
    processor and the family's video stand-in)."""
    from conftest import tiny_config
    from minivlm.build import load_processor
    from minivlm.plan import plan_memory

    path = request.getfixturevalue(f"tiny_{name}")
    cfg = tiny_config(path, tmp_path, tmp_path / "run", family=name)
    cfg.data.video_column, cfg.data.video_frames = "video", 5
    cfg.model.video_processor = VIDEO_RESOLUTION.get(name, {})
    family = get_family(name)
    clip = chat.Video([frame(i, (32, 32)) for i in range(5)], fps=2.0)  # 32×32: the largest the Qwen bounds allow
    processor = load_processor(cfg)
    batch = family.training_batch(processor, [[clip]], [[("<video> where", "top left")]])
    counted = int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN[name])).sum())
    plan = plan_memory(cfg)
    assert re.search(rf"a video of (up to )?{counted} (video|image) tokens \(5 frames", plan.tokens), plan.tokens
    without = plan_memory(tiny_config(path, tmp_path, tmp_path / "run", family=name))
    assert plan.vision_transient > without.vision_transient


def test_infer_answers_about_a_video_file_or_a_folder_of_frames(tiny_qwen2_5_vl, tmp_path):
    """infer.py --video: one sample, its video at the prompt's <video> marker, sampled by
    data.video_frames; a folder of frames the same; a marker count that does not fit is one line."""
    from minivlm.cli import infer

    write_video(tmp_path / "clip.mp4", frames=8, fps=4)
    (tmp_path / "frames").mkdir()
    for i in range(8):
        frame(i).save(tmp_path / "frames" / f"{i:02d}.png")
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nfamily = "qwen2_5_vl"\nname_or_path = "{tiny_qwen2_5_vl}"\n'
                      f'[model.video_processor]\nmin_pixels = 64\nmax_pixels = 1024\n'
                      f'[data]\nvideo_frames = 4\nprompt_template = "{{question}}"\n'
                      f'[train]\nmax_new_tokens = 3\n')
    common = ["--config", str(config), "--prompt", "<video> where is the shape"]
    from_file = infer.main([*common, "--video", str(tmp_path / "clip.mp4")])
    from_frames = infer.main([*common, "--video", str(tmp_path / "frames")])
    assert [r["video"] for r in from_file + from_frames] == [str(tmp_path / "clip.mp4"), str(tmp_path / "frames")]
    assert all(isinstance(r["answer"], str) and r["images"] == [] for r in from_file + from_frames)
    with pytest.raises(SystemExit, match=r"^error: the prompt has 0 <image> and 2 <video> marker\(s\) for 0 "
                                         r"image\(s\) and 1 video per sample"):
        infer.main(["--config", str(config), "--prompt", "<video> <video> x", "--video", str(tmp_path / "clip.mp4")])


def test_an_unmarked_video_goes_where_the_rows_media_put_it_and_markers_must_match_kinds(tmp_path):
    """Without markers a row's images, then its video, open the first user turn; with them, each
    marker takes the next medium, which must be of its kind."""
    from minivlm.data import BadSample, sample_of

    clip = chat.Video([frame(i) for i in range(2)], fps=2.0)
    assert chat.messages([("where", "top left")], [frame(0), clip])[0]["content"] == [
        {"type": "image"}, {"type": "video"}, {"type": "text", "text": "where"}]
    frame(1).save(tmp_path / "a.png")
    cfg = DataConfig(dataset="x", video_column="video", image_column="image", image_root=str(tmp_path))
    row = {"image": "a.png", "video": [frame(i) for i in range(2)], "answer": "top left"}
    media, dialog = sample_of(cfg, {**row, "question": "<image> then <video>: where"})
    assert [chat.kind(m) for m in media] == ["image", "video"]
    with pytest.raises(BadSample, match="markers <video> <image> do not match its media <image> <video>"):
        sample_of(cfg, {**row, "question": "<video> then <image>: where"})
    chat_layout = DataConfig(dataset="x", video_column="video", image_root=str(tmp_path), conversations_column="m")
    _, dialog = sample_of(chat_layout, {**row, "m": [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "image"}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "top left"}]}]})
    assert dialog == [("first\n<image>\n<video>", "top left")]  # HF chat parts become markers, in order
