"""lmms-eval runs `--model bunny` and answers exactly as `bunny eval run` does.

    .venv/bin/python scripts/lmms_eval_check.py [--out outputs/lmms-check] [--model PATH]
                                                 [--images 60] [--lmms-venv .venv-lmms]

(`make lmms-check` builds .venv-lmms first, with scripts/lmms_eval_env.sh.) Steps:
1. data: an MME-layout parquet file (the lmms-lab/MME columns and the `datasets` Image
   feature) of `--images` synthetic demo scenes, two yes/no questions each (one "yes", one
   "no"), so 120 questions by default;
2. model: `--model`, or the demo-sized Bunny (the embedded SmolLM2-135M, the shipped
   shapes-siglip-64 tower, the demo's word-grounded projector and template);
3. `bunny eval run mme --max-new-tokens 16` (lmms-eval's MME budget) in this, the project's,
   environment;
4. lmms-eval 0.7.3 in its own environment: its own `mme` task (prompts, images, scoring)
   with the dataset replaced by the local file and its generation settings stated as bunny's
   (greedy, 16 new tokens, and no `until`: lmms-eval otherwise stops at "\n\n", which bunny
   eval run does not), `--model bunny`, offline;
5. every answer compared; exit status 1 unless all are equal.
A summary is printed and written to OUT/summary.json.
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

ROOT = Path(__file__).resolve().parent.parent
TASK = "bunny_local_mme"
MAX_NEW_TOKENS = 16  # lmms-eval's mme task's budget, given to bunny eval run too
MME_FEATURES = {name: {"dtype": "string", "_type": "Value"}
                for name in ("question_id", "question", "answer", "category")}
MME_FEATURES["image"] = {"_type": "Image"}


def write_data(folder: Path, n_images: int, seed: int) -> Path:
    """The demo's held-out scenes as MME rows: per image its yes/no pair (existence questions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bunny.data.synthetic import draw_example
    from bunny.data.synthetic_render import render_scene

    rows = []
    for i in range(n_images):
        scene, qas = draw_example(seed, "eval", i)
        buf = io.BytesIO()
        render_scene(scene).save(buf, format="PNG")
        image = {"bytes": buf.getvalue(), "path": None}
        pair = qas[:2]  # draw_example puts the yes/no pair first
        if [qa["answer"] for qa in pair] != ["yes", "no"]:
            raise SystemExit(f"scene {i}: expected a yes/no pair first, got {pair}")
        for qa in pair:
            rows.append({"question_id": f"existence/{i:04d}.png", "image": image,
                         "question": qa["question"] + " Please answer yes or no.",
                         "answer": qa["answer"].capitalize(), "category": "existence"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the arrow type of datasets' Image
    schema = pa.schema([(name, image_type if name == "image" else pa.string()) for name in rows[0]])
    table = pa.Table.from_pylist(rows, schema=schema)
    # The schema metadata `datasets` writes: lmms-eval's MME task reads `image` as a PIL image.
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": MME_FEATURES}})})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


def build_demo_model(folder: Path, seed: int) -> Path:
    from bunny.model.loading import build_model, save_pretrained
    from bunny.train.demo_ground import fit_word_projector

    tower = ROOT / "src" / "bunny" / "assets" / "towers" / "shapes-siglip-64"
    model, processor = build_model("smollm2-135m", tower=str(tower), template="bunny-nosystem")
    fit_word_projector(model, processor.tokenizer, seed=seed)
    save_pretrained(model, processor, folder)
    return folder


def task_yaml(mme_yaml: Path, data: Path) -> str:
    """lmms-eval's own MME task on a local parquet file, generating as `bunny eval run` does."""
    return "\n".join([
        f"include: {json.dumps(str(mme_yaml))}",
        f"task: {TASK}",
        "dataset_path: parquet",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(data))}}}",
        "generation_kwargs:",
        f"  max_new_tokens: {MAX_NEW_TOKENS}",
        "  temperature: 0",
        "  do_sample: false",
        "  until: []",
        "",
    ])


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    return seconds


def lmms_answers(output: Path, log: Path) -> dict[int, tuple[str, str | None]]:
    """doc_id (the parquet row) -> (answer, the image's question_id lmms-eval logged)."""
    files = sorted(output.rglob(f"*samples_{TASK}*.jsonl"))
    if len(files) != 1:  # lmms-eval logs some failures and still exits 0
        raise SystemExit(f"expected one lmms-eval samples file for {TASK} under {output}, found {files}; "
                         f"last lines of {log}:\n{log.read_text()[-3000:]}")
    answers = {}
    for line in files[0].read_text().splitlines():
        sample = json.loads(line)
        answer = sample["filtered_resps"]  # the task's filter is "none": the model's text as it came
        answers[int(sample["doc_id"])] = (answer[0] if isinstance(answer, list) else answer,
                                          sample.get("input_media", [None])[0])
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/lmms-check")
    p.add_argument("--model", help="a bunny checkpoint (default: the demo-sized model, built here)")
    p.add_argument("--images", type=int, default=60, help="scenes; two questions each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lmms-venv", default=".venv-lmms")
    args = p.parse_args(argv)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lmms_bin = ROOT / args.lmms_venv / "bin"
    if not (lmms_bin / "lmms-eval").is_file():
        raise SystemExit(f"{lmms_bin / 'lmms-eval'} not found: build the environment with scripts/lmms_eval_env.sh")

    data = write_data(out / "data", args.images, args.seed)
    model = Path(args.model).resolve() if args.model else build_demo_model(out / "model", args.seed)

    bunny_out, lmms_out = out / "bunny", out / "lmms"
    for stale in (bunny_out, lmms_out):  # always a fresh run of both (bunny eval run would resume)
        shutil.rmtree(stale, ignore_errors=True)
    bunny_seconds = run([str(Path(sys.executable).parent / "bunny"), "eval", "run", "mme", "--model", str(model),
                         "--data", str(data.parent), "--out", str(bunny_out), "--batch-size", str(args.batch_size),
                         "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-progress"], out / "bunny.log")
    ours = [json.loads(line) for line in (bunny_out / "mme.predictions.jsonl").read_text().splitlines()]

    mme_yaml = subprocess.run([str(lmms_bin / "python"), "-c", "import lmms_eval, pathlib; print(pathlib.Path("
                               "lmms_eval.__file__).parent / 'tasks' / 'mme' / 'mme.yaml')"],
                              capture_output=True, text=True, check=True).stdout.strip()
    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(task_yaml(Path(mme_yaml), data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(out / "datasets-cache"))
    lmms_seconds = run([str(lmms_bin / "lmms-eval"), "--model", "bunny", "--model_args",
                        f"pretrained={model},device=cpu", "--batch_size", str(args.batch_size), "--tasks", TASK,
                        "--include_path", str(tasks), "--log_samples", "--output_path", str(lmms_out)],
                       out / "lmms.log", env=env)
    theirs = lmms_answers(lmms_out, out / "lmms.log")

    # lmms-eval's doc_id is the parquet row; bunny's id of row r is "{question_id}#{k}" (two per image).
    by_id = {record["question_id"]: record["prediction"] for record in ours}
    equal, differ = 0, []
    for row in range(2 * args.images):
        image = f"existence/{row // 2:04d}.png"
        qid = f"{image}#{row % 2}"
        answer, media = theirs.get(row, (None, None))
        if media != image:
            raise SystemExit(f"lmms-eval's doc {row} is image {media}, expected {image}")
        if qid in by_id and by_id[qid] == answer:
            equal += 1
        else:
            differ.append({"question_id": qid, "bunny": by_id.get(qid), "lmms_eval": answer})
    summary = {"questions": len(ours), "lmms_eval_answers": len(theirs), "equal": equal, "differ": differ[:10],
               "bunny_eval_seconds": round(bunny_seconds, 1), "lmms_eval_seconds": round(lmms_seconds, 1),
               "model": str(model), "data": str(data)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "differ"}))
    ok = equal == 2 * args.images == len(ours) == len(theirs)
    print("lmms-eval answers " + ("equal" if ok else "DIFFER from") + f" bunny eval run's: {equal}/{len(ours)}")
    for d in differ[:10]:
        print("  ", json.dumps(d))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
