"""`bunny eval run` end to end: a tiny random model on tiny benchmark files made here."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bunny.cli import main
from bunny.errors import BunnyError
from bunny.eval import predict as predict_module
from bunny.eval.run import run_benchmark
from bunny.model.loading import load_pretrained
from bunny.testing import random_image, save_tiny_bunny

NEW_TOKENS = 6  # random weights never stop early: keep generation short


def _img(seed, size=(36, 28)):
    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: extra intra-op threads only contend on a shared 2-core machine (15x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_bunny(tmp_path_factory.mktemp("ckpt") / "tiny", family="llama", tower="siglip")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained(checkpoint)


def _pope(folder, n=8):
    questions = ["Is there a cat in the image?", "Is there a red square?",
                 "Is there a dog in the picture? Answer briefly.", "Is there a car?"]
    rows = [dict(question_id=str(i), image=_img(i, (20 + 3 * i, 28)), category=("random", "popular", "adversarial")[i % 3],
                 question=questions[i % 4] + " word" * (i % 3), answer=("yes", "no")[i % 2])
            for i in range(n)]
    return _write(folder / "test-00000-of-00001.parquet", rows)


def _mme(folder):
    rows = [dict(question_id=f"count/{i // 2}.png", image=_img(100 + i // 2), category="count",
                 question=f"Are there {i} objects? Please answer yes or no.", answer=("Yes", "No")[i % 2])
            for i in range(6)]
    return _write(folder / "test-00000-of-00001.parquet", rows)


def _mmbench(folder, split="dev", answers=True):
    rows = [dict(index=i, question=f"Which shape number {i}?", hint=None if i % 2 else "A hint.",
                 A="circle", B="square", C="star" if i % 2 else None, D=None,
                 answer=("A" if i % 2 else "B") if answers else None, image=_img(200 + i))
            for i in range(3)]
    return _write(folder / f"{split}-00000-of-00001.parquet", rows)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pope_batch_1_and_4_identical_and_scored(tmp_path, loaded):
    data = _pope(tmp_path / "pope")
    one = run_benchmark("pope", "tiny", data=str(data), out=tmp_path / "b1", batch_size=1,
                        max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    four = run_benchmark("pope", "tiny", data=str(data), out=tmp_path / "b4", batch_size=4,
                         max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    p1 = (tmp_path / "b1" / "pope.predictions.jsonl").read_text()
    p4 = (tmp_path / "b4" / "pope.predictions.jsonl").read_text()
    assert p1 == p4  # same answers, same (dataset) order
    assert [r["question_id"] for r in _lines(tmp_path / "b1" / "pope.predictions.jsonl")] == \
        [str(i) for i in range(8)]
    assert one.metrics == four.metrics and set(one.metrics) == {"random", "popular", "adversarial", "f1_mean"}
    saved = json.loads((tmp_path / "b4" / "pope.results.json").read_text())
    assert saved["metrics"] == four.metrics and saved["generated"] == 8
    assert "| f1_mean |" in (tmp_path / "b4" / "pope.results.md").read_text()


def test_share_prefix_gives_the_same_predictions(tmp_path, loaded):
    """MME asks two questions per image; POPE here four per image: batched by image with the
    image run once per batch, the predictions file is the plain run's, byte for byte."""
    rows = [dict(question_id=str(i), image=_img(300 + i // 4), category=("random", "adversarial")[i % 2],
                 question=f"Is there a {('cat', 'red square', 'dog', 'car')[i % 4]} in the image?",
                 answer=("yes", "no")[i % 2]) for i in range(12)]
    pope = _write(tmp_path / "pope" / "test-00000-of-00001.parquet", rows)
    for bench, data in (("mme", _mme(tmp_path / "mme")), ("pope", pope)):
        plain = run_benchmark(bench, "tiny", data=str(data), out=tmp_path / f"{bench}-plain", batch_size=3,
                              max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
        shared = run_benchmark(bench, "tiny", data=str(data), out=tmp_path / f"{bench}-shared", batch_size=5,
                               max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded, share_prefix=True)
        assert (tmp_path / f"{bench}-plain" / f"{bench}.predictions.jsonl").read_text() == \
            (tmp_path / f"{bench}-shared" / f"{bench}.predictions.jsonl").read_text()
        assert plain.metrics == shared.metrics


def test_image_key_groups_equal_images():
    a, b = _img(1), _img(2)
    assert predict_module.image_key([a]) == predict_module.image_key([dict(a)])
    assert predict_module.image_key([a]) != predict_module.image_key([b])
    assert predict_module.image_key([a, b]) != predict_module.image_key([b, a])
    assert predict_module.image_key([]) == ""


def test_batch_equals_single_with_mixed_prompt_lengths(loaded):
    from bunny.model.generation import SamplingSettings, generate

    model, processor = loaded
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}])
               for q in ["Is it red?", "How many squares are in the image on the left side?", "Yes", "What?"]]
    images = [[random_image(i, (20 + 7 * i, 30))] for i in range(4)]
    settings = SamplingSettings(max_new_tokens=12)
    batched = generate(model, processor, prompts, images, settings)
    single = [generate(model, processor, [p], [im], settings)[0] for p, im in zip(prompts, images)]
    assert batched == single


def test_cli_run_mme_and_resume_after_interruption(tmp_path, checkpoint, loaded, monkeypatch, capsys):
    data = _mme(tmp_path / "mme")
    out = tmp_path / "out"
    args = ["eval", "run", "mme", "--model", str(checkpoint), "--data", str(data), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", str(NEW_TOKENS), "--no-progress"]
    assert main(args) == 0
    assert "| perception |" in capsys.readouterr().out
    full = (out / "mme.predictions.jsonl").read_text()

    # Interrupt a second run after its first batch, leaving half a line behind.
    out2 = tmp_path / "out2"
    real_append, calls = predict_module.append_records, []

    def crash_after_first(path, records):
        calls.append(len(records))
        if len(calls) == 2:
            with path.open("a") as f:
                f.write('{"question_id": "cut')
            raise KeyboardInterrupt
        real_append(path, records)

    monkeypatch.setattr(predict_module, "append_records", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark("mme", str(checkpoint), data=str(data), out=out2, batch_size=2,
                      max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    assert len(_lines_partial(out2 / "mme.predictions.jsonl")) == 2
    monkeypatch.setattr(predict_module, "append_records", real_append)
    resumed = run_benchmark("mme", str(checkpoint), data=str(data), out=out2, batch_size=2,
                            max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    assert resumed.generated == 4 and resumed.questions == 6
    assert (out2 / "mme.predictions.jsonl").read_text() == full
    again = run_benchmark("mme", str(checkpoint), data=str(data), out=out2, batch_size=2,
                          max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    assert again.generated == 0 and again.metrics == resumed.metrics


def _lines_partial(path):
    return [line for line in path.read_text().split("\n") if line.endswith("}")]


def test_resume_refuses_another_model_or_budget(tmp_path, loaded):
    data = _pope(tmp_path / "pope", n=2)
    run_benchmark("pope", "a", data=str(data), out=tmp_path, max_new_tokens=3, progress=False, loaded=loaded)
    with pytest.raises(BunnyError, match="another run .*model: 'a' -> 'b'"):
        run_benchmark("pope", "b", data=str(data), out=tmp_path, max_new_tokens=3, progress=False, loaded=loaded)
    with pytest.raises(BunnyError, match="max_new_tokens: 3 -> 4"):
        run_benchmark("pope", "a", data=str(data), out=tmp_path, max_new_tokens=4, progress=False, loaded=loaded)
    # Answers written by one engine are never resumed by the other.
    with pytest.raises(BunnyError, match="engine: 'torch' -> 'llama.cpp'"):
        run_benchmark("pope", "a", data=str(data), out=tmp_path, max_new_tokens=3, progress=False, loaded=loaded,
                      engine="llama.cpp")


def test_resume_reads_run_files_without_an_engine_as_torch(tmp_path, loaded):
    data = _pope(tmp_path / "pope", n=2)
    run_benchmark("pope", "a", data=str(data), out=tmp_path, max_new_tokens=3, progress=False, loaded=loaded)
    run_file = tmp_path / "pope.run.json"
    settings = json.loads(run_file.read_text())
    assert settings["engine"] == "torch"
    del settings["engine"]
    run_file.write_text(json.dumps(settings))
    again = run_benchmark("pope", "a", data=str(data), out=tmp_path, max_new_tokens=3, progress=False, loaded=loaded)
    assert again.generated == 0


def test_mmbench_dev_is_scored_circularly_with_limit(tmp_path, loaded):
    data = _mmbench(tmp_path / "mmb")
    result = run_benchmark("mmbench", "tiny", data=str(data), split="dev", out=tmp_path / "o",
                           limit=4, batch_size=3, max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    assert result.questions == 4 and set(result.metrics) == {"circular_accuracy", "unparseable"}
    ids = [r["question_id"] for r in _lines(tmp_path / "o" / "mmbench-dev.predictions.jsonl")]
    assert ids == [0, 1_000_000, 1, 1_000_001]


def test_server_splits_write_submissions(tmp_path, loaded):
    kw = dict(max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded, out=tmp_path / "o", batch_size=2)
    mmb = run_benchmark("mmbench", "tiny", data=str(_mmbench(tmp_path / "mmb", "test", answers=False)),
                        split="test", **kw)
    assert mmb.metrics is None
    tsv = (tmp_path / "o" / "mmbench-test.submission.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["index", "question", "hint", "A", "B", "C", "D", "prediction"]
    assert len(tsv) == 1 + 7  # 2 + 3 + 2 rotations

    rows = [dict(question_id=10 + i, image=_img(i), question=f"What color {i}?", answers=None,
                 question_type="what", answer_type="other") for i in range(3)]
    vqa = run_benchmark("vqav2", "tiny", data=str(_write(tmp_path / "vqa" / "testdev-0.parquet", rows)),
                        split="testdev", **kw)
    sub = json.loads((tmp_path / "o" / "vqav2-testdev.submission.json").read_text())
    assert [r["question_id"] for r in sub] == [10, 11, 12] and all(isinstance(r["answer"], str) for r in sub)
    assert vqa.submission["files"] == [str(tmp_path / "o" / "vqav2-testdev.submission.json")]

    rows = [dict(id=f"test_Art_{i}", question="Which?", options="['red', 'blue']", answer="?",
                 question_type="multiple-choice", image_1=_img(i)) for i in range(2)]
    rows.append(dict(id="test_Art_9", question="How many?", options="[]", answer="?",
                     question_type="open", image_1=_img(9)))
    mmmu = run_benchmark("mmmu", "tiny", data=str(_write(tmp_path / "mmmu" / "Art" / "test-0.parquet", rows)),
                         split="test", reference_fallback=True, seed=3, **kw)
    answers = json.loads((tmp_path / "o" / "mmmu-test.submission.json").read_text())
    assert sorted(answers) == ["test_Art_0", "test_Art_1", "test_Art_9"]
    assert all(answers[k] in ("A", "B") for k in ("test_Art_0", "test_Art_1"))  # parsed or drawn
    assert mmmu.submission["fallback_seed"] == 3


def test_scienceqa_uses_square_images_and_text_only_rows(tmp_path, loaded, monkeypatch):
    model, processor = loaded
    modes = []
    real = predict_module.eval_processor

    def spy(proc, bench):
        changed = real(proc, bench)
        modes.append((processor.image_mode, changed.image_mode))
        return changed

    monkeypatch.setattr(predict_module, "eval_processor", spy)
    rows = [dict(image=_img(1) if i else None, question=f"Which is metal {i}?", choices=["wood", "iron"],
                 answer=1, hint="Metals conduct." if i == 2 else "") for i in range(3)]
    result = run_benchmark("scienceqa", "tiny", data=str(_write(tmp_path / "sqa" / "test-0.parquet", rows)),
                           out=tmp_path / "o", batch_size=3, max_new_tokens=NEW_TOKENS, progress=False,
                           loaded=loaded)
    assert modes == [("pad", "square")] and result.metrics["unparseable"] >= 0


def test_bad_inputs(tmp_path, loaded, monkeypatch, capsys):
    kw = dict(progress=False, loaded=loaded, out=tmp_path / "o")
    _write(tmp_path / "bad" / "test-0.parquet", [dict(question="q", answer="yes")])
    with pytest.raises(BunnyError, match="not a pope dataset; missing columns: question_id, image, category"):
        run_benchmark("pope", "tiny", data=str(tmp_path / "bad"), **kw)
    with pytest.raises(BunnyError, match="unknown benchmark 'popee'; valid: mme, pope"):
        run_benchmark("popee", "tiny", data=str(tmp_path / "bad"), **kw)
    assert main(["eval", "run", "popee", "--model", "x", "--data", str(tmp_path)]) == 2
    assert "unknown benchmark 'popee'" in capsys.readouterr().err
    with pytest.raises(BunnyError, match="dataset path not found"):
        run_benchmark("pope", "tiny", data=str(tmp_path / "missing"), **kw)
    with pytest.raises(BunnyError, match="batch size must be at least 1"):
        run_benchmark("pope", "tiny", data=str(_pope(tmp_path / "p", 2)), batch_size=0, **kw)
    with pytest.raises(BunnyError, match="no random fallback"):
        run_benchmark("pope", "tiny", data=str(_pope(tmp_path / "p", 2)), reference_fallback=True, **kw)
    # Hub ids go through huggingface_hub; offline, the error says what to do.
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(BunnyError, match="cannot download dataset lmms-lab/POPE .*pass the local folder"):
        run_benchmark("pope", "tiny", **kw)


def test_predictions_file_of_another_dataset_is_refused(tmp_path, loaded):
    data = _pope(tmp_path / "pope", n=2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "pope.predictions.jsonl").write_text(json.dumps({"question_id": "zzz", "prediction": "yes"}) + "\n")
    with pytest.raises(BunnyError, match="not in this dataset .*'zzz'"):
        run_benchmark("pope", "tiny", data=str(data), out=out, progress=False, loaded=loaded)


def test_compile_gives_the_same_predictions_in_one_batch_shape(tmp_path, loaded, monkeypatch, capsys):
    """--compile: the predictions file is the plain run's byte for byte; the last, short batch
    is filled up to the batch size (one shape, one compile per cache bucket); a run resumes with
    or without it. The static path's step runs eagerly here (the compiled step has its own test,
    tests/model/test_decode_static.py)."""
    from bunny.model.decode_static import StaticDecoder

    batches = []
    real = StaticDecoder.__init__

    def init(self, lm, batch, length, compile=True):
        batches.append(batch)
        real(self, lm, batch, length, compile=False)
    monkeypatch.setattr(StaticDecoder, "__init__", init)
    data = _pope(tmp_path / "pope", n=8)
    kw = dict(data=str(data), batch_size=3, max_new_tokens=NEW_TOKENS, progress=False, loaded=loaded)
    run_benchmark("pope", "tiny", out=tmp_path / "plain", **kw)
    assert batches == []
    compiled = run_benchmark("pope", "tiny", out=tmp_path / "compiled", compile=True, **kw)
    assert batches == [3, 3, 3]  # 8 questions: 3 + 3 + (2 filled up to 3)
    assert (tmp_path / "plain" / "pope.predictions.jsonl").read_text() == \
        (tmp_path / "compiled" / "pope.predictions.jsonl").read_text()
    assert compiled.generated == 8 and compiled.compiled == {}  # nothing compiled with the eager step
    assert json.loads((tmp_path / "compiled" / "pope.run.json").read_text())["compile"] is True
    again = run_benchmark("pope", "tiny", out=tmp_path / "compiled", **kw)  # resumes without --compile
    assert again.generated == 0 and again.metrics == compiled.metrics
    # The llama.cpp engine decodes in its own loop: --compile is refused, not dropped.
    assert main(["eval", "run", "pope", "--model", "x", "--data", str(data), "--engine", "llama.cpp",
                 "--compile"]) == 2
    assert "--engine llama.cpp does not take --compile" in capsys.readouterr().err


def test_quantised_run_answers_as_the_quantised_model_and_resumes_only_so(tmp_path, checkpoint, capsys):
    from bunny.serve.quantize import Int8WeightOnlyLinear, quantize_model

    data = _pope(tmp_path / "pope", n=3)
    out = tmp_path / "out"
    args = ["eval", "run", "pope", "--model", str(checkpoint), "--data", str(data), "--out", str(out),
            "--max-new-tokens", "3", "--no-progress", "--quantize", "int8", "--group-size", "32"]
    assert main(args) == 0
    assert "quantised: int8/g32" in capsys.readouterr().out
    results = json.loads((out / "pope.results.json").read_text())
    assert results["quantize"] == "int8/g32"
    # The answers are the int8 model's: the same model quantised here and passed in answers alike.
    model, processor = load_pretrained(checkpoint)
    quantize_model(model, "int8", group_size=32)
    assert isinstance(model.language_model.get_output_embeddings(), Int8WeightOnlyLinear)
    run_benchmark("pope", str(checkpoint), data=str(data), out=tmp_path / "given", max_new_tokens=3,
                  progress=False, loaded=(model, processor))
    assert (out / "pope.predictions.jsonl").read_text() == (tmp_path / "given" / "pope.predictions.jsonl").read_text()
    # Resuming with another quantisation (or none) is refused; the same one resumes.
    with pytest.raises(BunnyError, match="quantize: 'int8/g32' -> None"):
        run_benchmark("pope", str(checkpoint), data=str(data), out=out, max_new_tokens=3, progress=False)
    with pytest.raises(BunnyError, match="quantize: 'int8/g32' -> 'int4/g64'"):
        run_benchmark("pope", str(checkpoint), data=str(data), out=out, max_new_tokens=3, progress=False,
                      quantize="int4")
    again = run_benchmark("pope", str(checkpoint), data=str(data), out=out, max_new_tokens=3, progress=False,
                          quantize="int8", group_size=32)
    assert again.generated == 0


def test_quantise_refusals(tmp_path, checkpoint, loaded, capsys):
    data = _pope(tmp_path / "pope", n=1)
    with pytest.raises(BunnyError, match="--group-size 32 applies with --quantize int8 or int4"):
        run_benchmark("pope", str(checkpoint), data=str(data), out=tmp_path, progress=False, group_size=32)
    for given in ({"quantize": "int8"}, {"group_size": 32}):
        with pytest.raises(BunnyError, match="quantize applies to a model it loads"):
            run_benchmark("pope", "x", data=str(data), out=tmp_path, progress=False, loaded=loaded, **given)
    assert not (tmp_path / "pope.run.json").exists()  # refused before the run's settings were written
    assert main(["eval", "run", "pope", "--model", str(checkpoint), "--data", str(data), "--engine", "llama.cpp",
                 "--quantize", "int8"]) != 0
    assert "--engine llama.cpp does not take --quantize" in capsys.readouterr().err


def test_bf16_run_answers_as_the_bf16_model_and_resumes_only_so(tmp_path, checkpoint, capsys, monkeypatch):
    from bunny.model import dtypes

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # as on a CPU with bf16
    data = _pope(tmp_path / "pope", n=3)
    out = tmp_path / "out"
    args = ["eval", "run", "pope", "--model", str(checkpoint), "--data", str(data), "--out", str(out),
            "--max-new-tokens", "3", "--no-progress", "--dtype", "bfloat16"]
    assert main(args) == 0
    assert "dtype: bfloat16" in capsys.readouterr().out
    assert json.loads((out / "pope.results.json").read_text())["dtype"] == "bfloat16"
    # The answers are the bf16 model's: the same checkpoint loaded in bf16 and passed in answers alike.
    model, processor = load_pretrained(checkpoint, dtype=torch.bfloat16)
    assert model.language_model.dtype == torch.bfloat16
    run_benchmark("pope", str(checkpoint), data=str(data), out=tmp_path / "given", max_new_tokens=3,
                  progress=False, loaded=(model, processor))
    assert (out / "pope.predictions.jsonl").read_text() == (tmp_path / "given" / "pope.predictions.jsonl").read_text()
    # Resuming in another dtype (or the checkpoint's) is refused; the same one resumes.
    with pytest.raises(BunnyError, match="dtype: 'bfloat16' -> None"):
        run_benchmark("pope", str(checkpoint), data=str(data), out=out, max_new_tokens=3, progress=False)
    again = run_benchmark("pope", str(checkpoint), data=str(data), out=out, max_new_tokens=3, progress=False,
                          dtype="bfloat16")
    assert again.generated == 0


def test_dtype_refusals(tmp_path, checkpoint, loaded, capsys, monkeypatch):
    from bunny.model import dtypes

    data = _pope(tmp_path / "pope", n=1)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # a CPU without bf16
    assert main(["eval", "run", "pope", "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path),
                 "--dtype", "bfloat16"]) != 0
    assert "--dtype bfloat16 on this CPU is refused" in capsys.readouterr().err
    with pytest.raises(BunnyError, match="dtype 'int8' is not one of float32, bfloat16, float16"):
        run_benchmark("pope", str(checkpoint), data=str(data), out=tmp_path, progress=False, dtype="int8")
    with pytest.raises(BunnyError, match="dtype applies to a model it loads"):
        run_benchmark("pope", "x", data=str(data), out=tmp_path, progress=False, loaded=loaded, dtype="float32")
    assert not (tmp_path / "pope.run.json").exists()  # refused before the run's settings were written
    assert main(["eval", "run", "pope", "--model", str(checkpoint), "--data", str(data), "--engine", "llama.cpp",
                 "--dtype", "bfloat16", "--gguf", "m.gguf", "--mmproj", "p.gguf"]) != 0
    assert "--dtype bfloat16 picks the type of the export --engine llama.cpp makes" in capsys.readouterr().err
