"""A large dataset: what loading, the first step and the bad-row scan cost at 200,000 rows.

    .venv/bin/python bench/big_data.py [--rows 200000] [--out /tmp/minivlm-big]   # needs `make base`

Writes the same rows three ways: an imagefolder (PNG files + metadata.jsonl), a JSON Lines file
naming the image files, and a Parquet file with the images' bytes inside. For each, in fresh
processes (the `datasets` cache emptied first, so the first load builds its Arrow cache, as a
user's first run does):

- load: `data.load_split`, its seconds and the process's peak RSS, cold (cache built) and warm;
- first step: `train.py` on the demo base with `data.dataset` set to it, 1 optimizer step, the
  seconds from start to the first log record, and its peak RSS;
- scan: `python -m minivlm.data`, which opens every image and reads every answer, its seconds
  and peak RSS;
- streamed (data.streaming = true): the first step's seconds and peak RSS, and what a resume
  halfway through the epoch costs: the seconds to read up to row rows/2 of the shuffled stream
  (steps.StreamSteps, images not decoded).

Peak RSS staying near the runtime's (~0.5 GB here) while the files hold 200,000 images is the
check that nothing is read whole into memory: `datasets` memory-maps its Arrow cache, and rows
are read a batch at a time. Writes <out>/results.json and prints it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 ** 2
QUESTIONS = [("what color is the shape", ["red", "green", "blue", "yellow"]),
             ("where is the shape", ["top left", "top right", "bottom left", "bottom right"])]


def write_rows(out: Path, rows: int) -> dict[str, Path]:
    """The three layouts of the same rows; 256 distinct 64 px images, each file its own copy."""
    import datasets
    from PIL import Image

    folder = out / "imagefolder" / "train"
    folder.mkdir(parents=True)
    pngs = []
    for k in range(256):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (k, (37 * k) % 256, (91 * k) % 256)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    meta, records = [], []
    for i in range(rows):
        name = f"{i:06d}.png"
        (folder / name).write_bytes(pngs[i % 256])
        question, answers = QUESTIONS[i % 2]
        row = {"question": question, "answer": answers[(i // 2) % 4]}
        meta.append(json.dumps({"file_name": name, **row}) + "\n")
        records.append({"image": str(folder / name), **row})
    (folder / "metadata.jsonl").write_text("".join(meta))
    jsonl = out / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = out / "rows.parquet"
    embedded = datasets.Dataset.from_dict({"image": [{"bytes": pngs[i % 256], "path": None} for i in range(rows)],
                                           "question": [r["question"] for r in records],
                                           "answer": [r["answer"] for r in records]},
                                          features=datasets.Features({"image": datasets.Image(),
                                                                      "question": datasets.Value("string"),
                                                                      "answer": datasets.Value("string")}))
    embedded.to_parquet(str(parquet))
    return {"imagefolder": folder.parent, "jsonl": jsonl, "parquet": parquet}


LOAD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from minivlm.config import DataConfig
from minivlm.data import load_split
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
ds = load_split(DataConfig(dataset={dataset!r}), "train")
print(json.dumps({{"rows": len(ds), "seconds": time.perf_counter() - t1,
                  "runtime_rss_mib": runtime / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


SKIP = """
import json, sys, time
sys.path.insert(0, {root!r})
from minivlm.config import DataConfig
from minivlm.data import load_split
from minivlm.steps import StreamSteps
cfg = DataConfig(dataset={dataset!r}, streaming=True)
t0 = time.perf_counter()
steps = StreamSteps(load_split(cfg, "train", streaming=True), cfg, "paligemma", None, 8, 1, 0, 0, 1,
                    start={{"epoch": 0, "row": {row}, "read": {row}}})
where, _ = next(steps._rows())
print(json.dumps({{"row": where["row"], "seconds": time.perf_counter() - t0}}))
"""


def timed(argv: list[str], env: dict, first_record: Path | None = None) -> dict:
    """Run `argv`; its seconds (to the first log record, if given) and peak RSS (from /proc, sampled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first = 0, None
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]))
        except (OSError, StopIteration):
            pass
        if first_record is not None and first is None and first_record.is_file() and first_record.stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode not in (0, 1):
        sys.exit(f"{argv} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak / 1024, "stdout_tail": stdout.strip()[-200:]}
    if first_record is not None:
        result["seconds_to_first_step"] = first
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--out", default="/tmp/minivlm-big")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    layouts = write_rows(out, args.rows)
    results: dict = {"rows": args.rows, "write_seconds": time.perf_counter() - t0}
    py = str(ROOT / ".venv/bin/python")
    for name, dataset in layouts.items():
        cache = out / f"hf-cache-{name}"
        env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        probe = LOAD.format(root=str(ROOT), dataset=str(dataset))
        loads = {}
        for when in ("cold", "warm"):
            proc = subprocess.run([py, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            loads[when] = json.loads(proc.stdout.strip().splitlines()[-1])
        run = out / f"run-{name}"
        sets = [f"data.dataset={dataset}", f"train.output_dir={run}", "train.max_steps=1", 'data.eval_split=""',
                "train.eval_every=0"]
        first = timed([py, "train.py", "--config", "configs/demo.toml", *sum((["--set", s] for s in sets), [])],
                      env, first_record=run / "log.jsonl")
        scan = timed([py, "-m", "minivlm.data", "--config", "configs/demo.toml", "--set", f"data.dataset={dataset}"],
                     env)
        streamed_run = out / f"run-{name}-streamed"
        streamed = timed([py, "train.py", "--config", "configs/demo.toml",
                          *sum((["--set", s] for s in [*sets, f"train.output_dir={streamed_run}",
                                                        "data.streaming=true"]), [])],
                         env, first_record=streamed_run / "log.jsonl")
        skip = subprocess.run([py, "-c", SKIP.format(root=str(ROOT), dataset=str(dataset), row=args.rows // 2)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if skip.returncode:
            sys.exit(skip.stderr[-3000:])
        streamed["resume_halfway"] = json.loads(skip.stdout.strip().splitlines()[-1])
        results[name] = {"load": loads, "first_step": first, "scan": scan, "streamed": streamed,
                         "cache_mib": sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / MiB}
        print(name, json.dumps(results[name], indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
