"""The instruct chat format: OpenAI-style messages to the model card's prompt."""

import base64

import pytest
import torch
from PIL import Image

from idefics.processing import Text, apply_chat_template

from .conftest import encode, pattern

EOU = "<end_of_utterance>"
IDEFIX = "This picture depicts Idefix, the dog of Obelix in Asterix and Obelix. Idefix is running on the ground."


def model_card_messages(first_url: str, second_url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": first_url}},
            ],
        },
        {"role": "assistant", "content": IDEFIX},
        {
            "role": "user",
            "content": [{"type": "image", "url": second_url}, {"type": "text", "text": "And who is that?"}],
        },
    ]


def model_card_prompt(first_url: str, second_url: str) -> list[str]:
    """The hand-written prompt of the idefics-9b-instruct model card (used with add_end_of_utterance_token=False)."""
    return [
        "User: What is in this image?",
        first_url,
        EOU,
        f"\nAssistant: {IDEFIX}{EOU}",
        "\nUser:",
        second_url,
        f"And who is that?{EOU}",
        "\nAssistant:",
    ]


def test_model_card_example():
    first, second = "https://example.com/Idefix.JPG", "https://example.com/R22b.gif"
    prompt = apply_chat_template(model_card_messages(first, second))
    assert prompt == [
        "User: What is in this image?",
        first,
        f"{EOU}\nAssistant: {IDEFIX}{EOU}\nUser:",
        second,
        f"And who is that?{EOU}\nAssistant:",
    ]
    assert "".join(prompt) == "".join(model_card_prompt(first, second))


@pytest.mark.parametrize("add_end_of_utterance_token", [None, True, False])
def test_processed_like_the_model_card_prompt(processor, image_server, add_end_of_utterance_token):
    base, _ = image_server
    first, second = f"{base}/photo.jpg", f"{base}/graph.png"
    ours = processor(
        processor.apply_chat_template(model_card_messages(first, second)),
        add_end_of_utterance_token=add_end_of_utterance_token,
    )
    card = processor(model_card_prompt(first, second), add_end_of_utterance_token=False)
    assert all(torch.equal(ours[key], card[key]) for key in card)


def test_system_message_string_content_and_no_generation_prompt():
    messages = [
        {"role": "system", "content": "You are a helpful visual assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
    ]
    assert apply_chat_template(messages, add_generation_prompt=False) == [
        f"You are a helpful visual assistant.\nUser: Hello!{EOU}\nAssistant: Hi.{EOU}\n"
    ]
    assert apply_chat_template(messages)[-1].endswith(f"{EOU}\nAssistant:")


def test_user_text_that_looks_like_a_url_stays_text(processor, sample_images):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": sample_images["pil_rgb"]}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": sample_images["pil_l"]},
                {"type": "text", "text": "http://127.0.0.1:9/x.png"},
            ],
        },
    ]
    prompt = apply_chat_template(messages)
    assert isinstance(prompt[-1], Text) and prompt[-1].startswith("http://127.0.0.1:9/x.png")
    out = processor(prompt)  # nothing is fetched: the port is closed
    assert (out.input_ids == processor.image_token_id).sum() == 2


def test_inline_images_and_data_urls(sample_images):
    png = encode(Image.fromarray(pattern(12, 8, 1)), "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    array = sample_images["array_uint8"]
    content = [
        {"type": "image_url", "image_url": data_url},
        {"type": "image", "image": array},
        {"type": "text", "text": "Compare."},
    ]
    prompt = apply_chat_template([{"role": "user", "content": content}])
    assert prompt[0] == "User:" and isinstance(prompt[1], Image.Image) and prompt[1].size == (12, 8)
    assert prompt[2] is array and prompt[3] == f"Compare.{EOU}\nAssistant:"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "no messages given"),
        (["hi"], "message 0: expected a dict"),
        ([{"role": "robot", "content": "hi"}], "message 0: unknown role 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "message 1: a system message can"),
        ([{"role": "assistant", "content": [{"type": "image", "url": "http://a.b/c.png"}]}], "message 0: assistant"),
        ([{"role": "user", "content": 3}], "message 0: content must be a string or a list"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "message 0, part 0: expected a dict of type"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "message 0, part 0: a text part needs"),
        (
            [{"role": "user", "content": [{"type": "image", "url": "not a url"}]}],
            "message 0, part 0: expected an image",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
            "message 0, part 0: data URL",
        ),
    ],
)
def test_bad_messages_raise_clear_errors(messages, message):
    with pytest.raises((TypeError, ValueError), match=message):
        apply_chat_template(messages)
