"""Few-shot prompt construction: the number of shots, no leakage of the query, interleaving and image attention."""

import pytest
from PIL import Image

from idefics.evaluation.data import DataError, load_vqa
from idefics.evaluation.postprocess import clean_answer, stop_strings
from idefics.evaluation.prompts import TEMPLATES, PromptTemplate, answer_of, build_prompt, sample_shots
from idefics.processing.processor import IMAGE_TOKEN

from .conftest import vqa_paths


@pytest.fixture(scope="module")
def vqa(eval_sets):
    paths = vqa_paths(eval_sets)
    queries = load_vqa(paths["questions"], paths["annotations"], paths["images"])
    support = load_vqa(paths["train_questions"], paths["train_annotations"], paths["train_images"])
    return queries, support


def test_shots_never_include_the_query(vqa):
    queries, _ = vqa
    for seed in range(5):
        for query in queries:
            shots = sample_shots(queries, query, shots=4, seed=seed, trial=0)
            assert len(shots) == 4 and len({s.question_id for s in shots}) == 4
            assert all(s.question_id != query.question_id and s.image != query.image for s in shots)


def test_shots_are_seeded_per_query_and_trial(vqa):
    queries, support = vqa
    draw = lambda q, **kw: [s.question_id for s in sample_shots(support, q, shots=4, **kw)]  # noqa: E731
    assert draw(queries[0], seed=1, trial=0) == draw(queries[0], seed=1, trial=0)
    assert draw(queries[0], seed=1, trial=0) != draw(queries[0], seed=1, trial=1)
    assert draw(queries[0], seed=1, trial=0) != draw(queries[1], seed=1, trial=0)
    with pytest.raises(DataError, match="support set has only 11 besides the query"):
        sample_shots(queries, queries[0], shots=12, seed=0, trial=0)


@pytest.mark.parametrize("style", ["base", "instruct"])
def test_prompt_interleaves_shots_and_query(vqa, demo_model, style):
    queries, support = vqa
    query = queries[0]
    shots = sample_shots(support, query, shots=3, seed=0, trial=0)
    prompt = build_prompt(query, shots, template=TEMPLATES["vqa"], style=style)
    images = [item for item in prompt if isinstance(item, Image.Image)]
    assert len(images) == 4
    texts = [item for item in prompt if isinstance(item, str)]
    assert not any(isinstance(a, str) and isinstance(b, str) for a, b in zip(prompt[:-1], prompt[1:], strict=True))
    joined = "".join(texts)
    for shot in shots:  # each shot shows its question and answer, in order, before the query
        assert f"{shot.question}" in joined and answer_of(shot) in joined
    assert joined.rstrip().endswith("Short answer:" if style == "base" else "Assistant:")
    assert query.question in joined.split(answer_of(shots[-1]))[-1]  # the query comes last, without an answer
    if style == "base":
        assert texts[0].startswith("Question:") and texts[0].endswith(f"Short answer:{answer_of(shots[0])}\n")

    # image attention: the text after each image (its question, its answer) attends to that image only
    _, processor = demo_model
    inputs = processor(prompt, add_end_of_utterance_token=False)
    ids, mask = inputs["input_ids"][0], inputs["image_attention_mask"][0]  # (t,), (t, n)
    image_positions = (ids == processor.image_token_id).nonzero().flatten().tolist()
    assert len(image_positions) == 4 and mask.shape[1] == 4
    for n, start in enumerate(image_positions):
        end = image_positions[n + 1] if n + 1 < len(image_positions) else len(ids)
        assert mask[start:end, n].all() and mask[start:end].sum() == end - start
    assert mask[: image_positions[0]].sum() == 0


@pytest.mark.parametrize("style", ["base", "instruct"])
def test_text_only_shots(vqa, style):
    queries, support = vqa
    shots = sample_shots(support, queries[0], shots=2, seed=0, trial=0)
    prompt = build_prompt(queries[0], shots, template=TEMPLATES["vqa"], style=style, text_only_shots=True)
    assert sum(isinstance(item, Image.Image) for item in prompt) == 1
    assert isinstance(prompt[-1], str) and isinstance(prompt[-2], Image.Image)  # the query's image, then its text
    assert all(IMAGE_TOKEN not in item for item in prompt if isinstance(item, str))


def test_custom_template_and_stops(vqa):
    queries, _ = vqa
    template = PromptTemplate(base="Image:<image>Q: {question}\nA: {answer}", instruct="{question}", separator="\n\n")
    prompt = build_prompt(queries[0], [], template=template, style="base")
    assert prompt[0] == "Image:" and prompt[2] == f"Q: {queries[0].question}\nA: "
    stops = stop_strings(template)
    assert "Image:" in stops and "Q:" in stops and "\n" in stops
    assert clean_answer(" red\nQ: what", stops=stops) == "red"
    assert clean_answer('"blue" Question: x', stops=stops) == "blue"
    with pytest.raises(ValueError, match="has no {answer} field"):
        PromptTemplate(base="<image>{question}", instruct="{question}")
