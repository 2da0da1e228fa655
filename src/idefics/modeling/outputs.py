"""Output records with the reference's field names."""

from dataclasses import dataclass

import torch

from ..cache import IdeficsCache


@dataclass
class _Output:
    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [k for k, v in vars(self).items() if v is not None]

    @property
    def cache(self) -> IdeficsCache | None:  # transformers 5 name of `past_key_values`
        return self.past_key_values


@dataclass
class IdeficsModelOutput(_Output):
    last_hidden_state: torch.Tensor  # (b, t, d) after the final norm
    past_key_values: IdeficsCache | None = None
    image_hidden_states: torch.Tensor | None = None  # (b, n, s, d_img): what the gated layers attend to


@dataclass
class IdeficsCausalLMOutput(_Output):
    logits: torch.Tensor  # (b, t, vocab + additional)
    loss: torch.Tensor | None = None
    past_key_values: IdeficsCache | None = None
    image_hidden_states: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
