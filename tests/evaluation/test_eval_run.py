"""The driver end to end on the demo model: batching, resume, settings checks, classification and the CLI."""

import json

import pytest

from idefics.cli import main
from idefics.evaluation import EvalConfig, evaluate, format_table
from idefics.evaluation.data import load_vqa
from idefics.evaluation.postprocess import stop_strings
from idefics.evaluation.predictor import GeneratePredictor
from idefics.evaluation.prompts import TEMPLATES, build_prompt, sample_shots

from .conftest import vqa_paths


def vqa_config(root, output, **kw) -> EvalConfig:
    return EvalConfig(task="vqa", output=str(output), progress=False, **vqa_paths(root), **kw)


def test_same_prediction_alone_and_in_a_batch(eval_sets, demo_model):
    model, processor = demo_model
    paths = vqa_paths(eval_sets)
    queries = load_vqa(paths["questions"], paths["annotations"], paths["images"])
    # prompts of different lengths (0 to 2 shots) so that the batch is left-padded
    prompts = [
        build_prompt(q, sample_shots(queries, q, shots=i % 3, seed=0, trial=0), template=TEMPLATES["vqa"],
                     style="instruct")
        for i, q in enumerate(queries[:6])
    ]  # fmt: skip
    predict = GeneratePredictor(model, processor, max_new_tokens=8, stop_strings=stop_strings(TEMPLATES["vqa"]))
    batched = predict(prompts)
    alone = [predict([p])[0] for p in prompts]
    assert batched == alone
    assert batched[0] in ("Red.", "Green.", "Blue.", "Yellow.", "Purple.", "Orange.", "A circle.", "A square.",
                          "A triangle.")  # fmt: skip


def test_resume_after_a_kill_gives_the_same_metrics(eval_sets, demo_model, tmp_path):
    model, processor = demo_model
    whole = evaluate(
        vqa_config(eval_sets, tmp_path / "whole", shots=(0, 2), trials=2), model=model, processor=processor
    )
    assert set(whole["vqa_accuracy"]) == {"0", "2"} and len(whole["vqa_accuracy"]["2"]["trials"]) == 2
    assert whole["vqa_accuracy"]["0"]["mean"] > 50  # the demo model answers its own questions

    config = vqa_config(eval_sets, tmp_path / "killed", shots=(0, 2), trials=2, batch_size=4)
    inner = GeneratePredictor(model, processor, max_new_tokens=10, stop_strings=stop_strings(TEMPLATES["vqa"]))
    calls = []

    def dying(prompts):
        if len(calls) == 4:  # 16 of 36 predictions written
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return inner(prompts)

    with pytest.raises(KeyboardInterrupt):
        evaluate(config, model=model, processor=processor, predict=dying)
    predictions = tmp_path / "killed" / "predictions.jsonl"
    assert len(predictions.read_text().splitlines()) == 16
    with open(predictions, "a") as f:
        f.write('{"question_id": 10, "sho')  # a line cut short by the kill
    calls.clear()
    resumed = evaluate(config, model=model, processor=processor, predict=lambda p: calls.append(len(p)) or inner(p))
    assert sum(calls) == 36 - 16
    assert resumed == whole
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 36 and set(rows[0]) >= {"question_id", "shots", "trial", "prediction"}
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text()) == whole


def test_engine_gives_the_same_predictions(eval_sets, demo_model, tmp_path):
    model, processor = demo_model
    plain = evaluate(vqa_config(eval_sets, tmp_path / "plain", shots=(0, 1), trials=1, batch_size=3),
                     model=model, processor=processor)  # fmt: skip
    engine = evaluate(vqa_config(eval_sets, tmp_path / "engine", shots=(0, 1), trials=1, batch_size=3, engine=True),
                      model=model, processor=processor)  # fmt: skip
    assert engine == plain
    rows = lambda name: (tmp_path / name / "predictions.jsonl").read_text()  # noqa: E731
    assert rows("engine") == rows("plain")
    with pytest.raises(ValueError, match="the engine decodes greedily"):
        vqa_config(eval_sets, tmp_path, engine=True, num_beams=3)


def test_beam_search(eval_sets, demo_model, tmp_path):
    model, processor = demo_model
    config = vqa_config(eval_sets, tmp_path, shots=(0,), num_beams=3, num_samples=4)
    assert evaluate(config, model=model, processor=processor)["vqa_accuracy"]["0"]["mean"] > 50


def test_rerun_with_other_settings_is_refused(eval_sets, demo_model, tmp_path):
    model, processor = demo_model
    evaluate(vqa_config(eval_sets, tmp_path, shots=(0,), num_samples=2), model=model, processor=processor)
    with pytest.raises(ValueError, match="made with num_samples=2, not 3; use another --output"):
        evaluate(vqa_config(eval_sets, tmp_path, shots=(0,), num_samples=3), model=model, processor=processor)
    (tmp_path / "predictions.jsonl").unlink()  # no predictions yet (say, the model failed to load): settings may change
    evaluate(vqa_config(eval_sets, tmp_path, shots=(0,), num_samples=3), model=model, processor=processor)
    assert json.loads((tmp_path / "run.json").read_text())["num_samples"] == 3


def test_classification_ranks_class_names(eval_sets, demo_model, tmp_path):
    model, processor = demo_model
    annotations = json.loads((eval_sets / "vqa/val_annotations.json").read_text())["annotations"]
    questions = json.loads((eval_sets / "vqa/val_questions.json").read_text())["questions"]
    rows = []
    for q, a in zip(questions, annotations, strict=True):
        if q["question"] == "What shape is this?":
            image = f"vqa/val/shapes_val_{q['image_id']:012d}.png"
            shape = a["multiple_choice_answer"].lower().strip("!.").split()[-1]  # "Circle", "a circle", "circle!"
            rows.append({"image": image, "label": f"A {shape}."})
    # image paths are relative to the JSONL file
    (eval_sets / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "classes.txt").write_text("A circle.\nA square.\nA triangle.\n")
    config = EvalConfig(task="classification", output=str(tmp_path / "out"), data=str(eval_sets / "cls.jsonl"),
                        classes=str(tmp_path / "classes.txt"), shots=(0,), instruct_template="What shape is this?",
                        progress=False)  # fmt: skip
    metrics = evaluate(config, model=model, processor=processor)
    assert metrics["accuracy"]["0"]["mean"] >= 80


def test_cli_end_to_end(eval_sets, tmp_path, capsys):
    paths = vqa_paths(eval_sets)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in paths.items()]
    status = main(["eval", "--task", "vqa", *args, "--shots", "0,1", "--trials", "1", "--num-samples", "4",
                   "--output", str(tmp_path), "--no-progress"])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert format_table(metrics) in out
    assert set(metrics["vqa_accuracy"]) == {"0", "1"}
    assert set(metrics["vqa_accuracy"]["1"]) == {"mean", "std", "trials"}
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 8


def test_cli_captions(eval_sets, tmp_path, capsys):
    pytest.importorskip("pycocoevalcap", reason="CIDEr needs the `eval` extra")
    import shutil

    if shutil.which("java") is None:
        pytest.skip("CIDEr's tokenizer needs Java, which is not installed")
    status = main(["eval", "--task", "caption", f"--annotations={eval_sets / 'caption/val_captions.json'}",
                   f"--images={eval_sets / 'caption/val'}", "--shots", "0", "--num-samples", "4",
                   "--output", str(tmp_path), "--no-progress"])  # fmt: skip
    assert status == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["cider"]["0"]["mean"] > 50


def test_cli_user_errors(eval_sets, tmp_path, capsys):
    paths = vqa_paths(eval_sets, train=False)
    base = ["eval", "--task", "vqa", "--output", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--questions", paths["questions"], "--images", str(tmp_path / "nope")]) == 2
    assert "--images folder" in capsys.readouterr().err
    assert main([*base, "--images", paths["images"]]) == 2
    assert "task 'vqa' needs questions (--questions)" in capsys.readouterr().err
    assert main([*base, "--questions", paths["questions"], "--images", paths["images"], "--shots", "0,x"]) == 2
    assert "--shots must be comma-separated numbers" in capsys.readouterr().err
    missing = tmp_path / "q.json"
    missing.write_text(json.dumps({"questions": [{"image_id": 999, "question": "Q?", "question_id": 1}]}))
    assert main([*base, "--questions", str(missing), "--images", paths["images"]]) == 2
    assert "no image for image_id 999" in capsys.readouterr().err


def test_answer_choices_constrain_vqa_answers(eval_sets, demo_model, tmp_path):
    """The demo model's free answers are all among its classes, so constraining to them changes no prediction; a
    list without the true answers forces every answer into it."""
    model, processor = demo_model
    answers = ["Red.", "Green.", "Blue.", "Yellow.", "Purple.", "Orange.", "A circle.", "A square.", "A triangle."]
    (tmp_path / "answers.txt").write_text("\n".join(answers) + "\n")
    (tmp_path / "wrong.txt").write_text("maybe\nno idea\n")
    kw = dict(shots=(0,), trials=1, num_samples=6)
    plain = evaluate(vqa_config(eval_sets, tmp_path / "plain", **kw), model=model, processor=processor)
    for name, engine in (("generate", False), ("engine", True)):
        config = vqa_config(eval_sets, tmp_path / name, answer_choices=str(tmp_path / "answers.txt"), engine=engine,
                            **kw)  # fmt: skip
        assert evaluate(config, model=model, processor=processor) == plain
    rows = lambda name: [json.loads(r) for r in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert (
        [r["raw"] for r in rows("generate")] == [r["raw"] for r in rows("plain")] == [r["raw"] for r in rows("engine")]
    )
    forced = vqa_config(eval_sets, tmp_path / "forced", answer_choices=str(tmp_path / "wrong.txt"), **kw)
    evaluate(forced, model=model, processor=processor)
    assert {r["raw"] for r in rows("forced")} <= {"maybe", "no idea"}
    with pytest.raises(ValueError, match="answer_choices constrains greedy VQA answers"):
        vqa_config(eval_sets, tmp_path, answer_choices=str(tmp_path / "answers.txt"), num_beams=2)
