"""Images repeated in a batch are projected to image keys/values once, with the same values as projecting each."""

import torch

import idefics
from idefics.modeling.distinct import distinct_rows


def test_distinct_rows_finds_exact_copies_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g)
    near = x[1].clone()
    near[2, 1] = torch.nextafter(near[2, 1], torch.tensor(9.0))  # one ulp away: another row
    rows = torch.stack([x[0], x[1], x[0], near, x[4], x[1], torch.zeros(4, 3), torch.zeros(4, 3)])
    first, inverse = distinct_rows(rows)
    assert first == [0, 1, 3, 4, 6] and inverse == [0, 1, 0, 2, 3, 1, 4, 4]
    assert torch.equal(rows[first][inverse], rows)
    assert distinct_rows(torch.full((2, 3), float("nan"))) == ([0, 1], [0, 1])  # NaN equals nothing: kept apart
    assert distinct_rows(x[:1]) == ([0], [0]) and distinct_rows(x[:0]) == ([], [])


def test_project_images_of_repeated_images_equals_projecting_each(reference_checkpoints):
    _, folder = reference_checkpoints("resampler_qk_interval2")
    model = idefics.IdeficsForVisionText2Text.from_pretrained(folder).model
    g = torch.Generator().manual_seed(1)
    width = model.config.vision_config.embed_dim
    s = model.config.perceiver_config.resampler_n_latents
    a, b = torch.randn(s, width, generator=g), torch.randn(s, width, generator=g)  # two images' states
    states = torch.stack([torch.stack([a, b]), torch.stack([b, torch.zeros_like(a)]), torch.stack([a, a])])  # (3, 2)
    with torch.inference_mode():
        shared = model.project_images(states)
        each = [[layer.cross_attn.project_image(states[r].flatten(0, 1)[None]) for layer in
                 model.gated_cross_attn_layers] for r in range(3)]  # fmt: skip
    assert len(shared) == len(model.gated_cross_attn_layers)
    for layer, (k, v) in enumerate(shared):
        assert k.shape == v.shape == (3, model.num_heads, 2 * s, model.config.head_dim)
        for r in range(3):
            torch.testing.assert_close(k[r], each[r][layer][0][0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v[r], each[r][layer][1][0], rtol=1e-6, atol=1e-6)
        assert torch.equal(k[0, :, :s], k[2, :, s:]) and torch.equal(k[0, :, s:], k[1, :, :s])  # one projection of b
