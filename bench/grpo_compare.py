"""minivlm's GRPO against TRL's GRPOTrainer + PEFT, on the GRPO demo's job (`make grpo-demo`).

    .venv/bin/python bench/grpo_compare.py [--steps 40] [--runs 2]     (needs make base and make grpo-data)

The same job both ways, each run a fresh process, the sides alternating (A B A B):

    minivlm   python train.py --config configs/grpo_demo.toml
    TRL       from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant)) ->
              GRPOTrainer(peft_config=LoraConfig(...), reward_funcs=demo.rewards.caption_parts)

on the tiny pretrained PaliGemma: 8 prompts ("en") × 16 sampled captions a step (TRL counts
completions: per_device_train_batch_size = 128), up to 8 new tokens at temperature 1, the DAPO
loss, β = 0, one update per sampled batch, lr 5e-3 with 5 warmup steps and a cosine decay, 8-bit
AdamW, clipping at 1, LoRA r 8 / α 16 / no dropout on the decoder's seven projections, 4-bit NF4
with double quantization, fp32 on the CPU. Not aligned: the prompts each step trains on (each
side shuffles with its own sampler) and the random draws.

Measured per run: seconds per optimizer step (the median over the run's steps after the first),
the share of the training loop's seconds spent sampling (TRL: in `generate`; minivlm: its
`sample_s`, which adds decoding and the rewards), the mean reward of the sampled
completions over the last 10 steps, and greedy accuracy on the first 128 test images after
training, scored the same way for both (minivlm.evaluate on minivlm's side; on TRL's, greedy
`generate` on the family's generation batch and the same exact match). Results go to
bench/results/<date>-grpo.json and are printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/grpo_demo.toml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_minivlm(steps: int, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(CONFIG),
                           "--set", f"train.max_steps={steps}", "--set", "train.eval_every=0",
                           "--set", f"train.output_dir={out}"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_log = [r for r in log if "loss" in r]
    ends = [r["seconds"] for r in steps_log]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"step_seconds": statistics.median(b - a for a, b in zip(ends, ends[1:])),
            "generate_seconds": sum(r["sample_s"] for r in steps_log),  # generate, decoding and the rewards
            "train_seconds": ends[-1],  # the loop, from its start to the last step's end
            "last_rewards": statistics.mean(r["reward"] for r in steps_log[-10:]),
            "accuracy_after": metrics["accuracy_after"]}


def run_trl(steps: int, out: Path) -> dict:
    """TRL's side, in this process (started as `--side trl`)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import (AutoProcessor, BitsAndBytesConfig, PaliGemmaForConditionalGeneration,
                              TrainerCallback)
    from trl import GRPOConfig, GRPOTrainer

    from demo.rewards import caption_parts
    from minivlm.config import load_config
    from minivlm.data import load_split
    from minivlm.metrics import accuracy
    from minivlm.models import paligemma

    cfg = load_config(CONFIG)
    base = ROOT / cfg.model.name_or_path
    processor = AutoProcessor.from_pretrained(base)
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"]))
    # TRL's GRPOTrainer takes images only with conversational prompts, and applies the processor's
    # chat template, which PaliGemma has none of: this one writes the user's text alone, so the
    # processor sees "en" as minivlm's generation_batch gives it (image tokens, <bos>, "en\n").
    processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                               "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    train = load_split(cfg.data, "train").map(
        lambda row: {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]},
        remove_columns=["question"])

    def reward(prompts, completions, color, shape, position, **_) -> list[float]:
        # Conversational prompts make conversational completions: [{"role": "assistant", "content": text}].
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        rows = [{"color": c, "shape": s, "position": p} for c, s, p in zip(color, shape, position)]
        return caption_parts(prompts, [t.strip() for t in texts], rows)

    generating = [0.0]
    real_generate = model.generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_generate(*args, **kwargs)
        finally:
            generating[0] += time.perf_counter() - start

    model.generate = timed_generate  # TRL samples through the base model's generate (PEFT forwards to it)
    step_ends, rewards = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    g = cfg.grpo
    args = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=cfg.train.batch_size *
                      g.num_generations, num_generations=g.num_generations, max_completion_length=g.max_new_tokens,
                      temperature=g.temperature, top_p=g.top_p, top_k=0, learning_rate=cfg.train.lr,
                      lr_scheduler_type="cosine", warmup_steps=cfg.train.warmup_steps, optim="paged_adamw_8bit",
                      max_grad_norm=cfg.train.max_grad_norm, beta=g.beta, loss_type=g.loss_type,
                      scale_rewards=g.scale_rewards, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                      seed=cfg.train.seed, gradient_checkpointing=False, save_strategy="no", dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=train, processing_class=processor,
                          peft_config=LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=TARGETS), callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start

    test = load_split(cfg.data, "test")
    n = min(cfg.data.eval_samples, len(test))
    trained = trainer.model
    trained.eval()
    predictions = []
    with torch.no_grad():
        for i in range(0, n, 16):
            rows = test.select(range(i, min(i + 16, n)))
            batch = paligemma.generation_batch(processor, [[r["image"].convert("RGB")] for r in rows],
                                               [r["question"] for r in rows])
            ids = trained.generate(**batch, max_new_tokens=cfg.train.max_new_tokens, do_sample=False)
            predictions += [t.strip() for t in processor.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:],
                                                                                 skip_special_tokens=True)]
    references = [[test[i]["caption"]] for i in range(n)]
    return {"step_seconds": statistics.median(b - a for a, b in zip(step_ends, step_ends[1:])),
            "generate_seconds": generating[0], "train_seconds": total,
            "last_rewards": statistics.mean(rewards[-10:]), "accuracy_after": accuracy(predictions, references)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)  # a child process's
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_trl(args.steps, args.out)))
        return
    results: dict[str, list[dict]] = {"minivlm": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            for side in ("minivlm", "trl"):
                out = Path(tmp) / f"{side}-{k}"
                if side == "minivlm":
                    result = run_minivlm(args.steps, out)
                else:
                    done = subprocess.run([sys.executable, __file__, "--side", "trl", "--steps", str(args.steps),
                                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(done.stderr[-3000:])
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                results[side].append(result)
                print(side, k, json.dumps(result), flush=True)
    summary = {side: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for side, runs in results.items()}
    for side in summary.values():
        side["generate_share"] = side["generate_seconds"] / side["train_seconds"]
    summary["ratio_step_seconds_trl_over_minivlm"] = summary["trl"]["step_seconds"] / summary["minivlm"]["step_seconds"]
    record = {"date": datetime.date.today().isoformat(), "steps": args.steps, "runs": results, "median": summary}
    path = ROOT / f"bench/results/{record['date']}-grpo.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
