"""IDEFICS: a LLaMA decoder with a gated cross-attention layer before every `cross_layer_interval`-th decoder layer,
attending to CLIP image states (optionally compressed by a perceiver resampler).

Legend for shape comments: b batch, t new text tokens, T cached + new tokens, n images per row, s image tokens per
image, d width, h heads, hd head width, v vocabulary (regular + additional).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import IdeficsCache, KVCache
from ..config import IdeficsConfig
from .cross_attention import IdeficsGatedCrossAttentionLayer
from .distinct import distinct_rows
from .embeddings import IdeficsDecoupledEmbedding, IdeficsDecoupledLinear
from .freeze import freeze_module
from .layers import IdeficsRMSNorm
from .loss import causal_lm_loss, labelled_lm_loss
from .masks import causal_mask, image_masks, position_ids_from
from .outputs import IdeficsCausalLMOutput, IdeficsModelOutput
from .perceiver import IdeficsPerceiverResampler
from .pretrained import PretrainedMixin
from .rope import IdeficsRotaryEmbedding
from .text import IdeficsDecoderLayer
from .vision import IdeficsVisionTransformer


class IdeficsModel(PretrainedMixin, nn.Module):
    """The IDEFICS backbone: embeddings, vision encoder, perceiver, decoder + gated layers, final norm."""

    checkpoint_prefix = "model."

    def __init__(self, config: IdeficsConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = IdeficsDecoupledEmbedding(
            config.vocab_size, config.additional_vocab_size, config.hidden_size, frozen=config.freeze_text_layers
        )
        self.vision_model = IdeficsVisionTransformer(config.vision_config)
        if config.use_resampler:
            self.perceiver_resampler = IdeficsPerceiverResampler(config)
        self.layers = nn.ModuleList(IdeficsDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gated_cross_attn_layers = nn.ModuleList(
            IdeficsGatedCrossAttentionLayer(config) for _ in range(config.num_cross_layers)
        )
        self.norm = IdeficsRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = IdeficsRotaryEmbedding(
            config.head_dim, theta=config.rope_theta, scaling_factor=config.rope_scaling_factor
        )
        self.gradient_checkpointing = False
        self.freeze_relevant_params(config)

    # -- training switches -------------------------------------------------------------------------------------
    def freeze_relevant_params(self, config: IdeficsConfig | None = None) -> None:
        config = config or self.config
        if config.freeze_text_layers:
            self.freeze_text_layers(config.freeze_text_module_exceptions)
        if config.freeze_vision_layers:
            self.freeze_vision_layers(config.freeze_vision_module_exceptions)

    def freeze_text_layers(self, module_exceptions: list[str] | tuple[str, ...] = ()) -> None:
        freeze_module(self.layers, module_exceptions)
        freeze_module(self.norm, module_exceptions)

    def freeze_vision_layers(self, module_exceptions: list[str] | tuple[str, ...] = ()) -> None:
        freeze_module(self.vision_model, module_exceptions)

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    # -- images ------------------------------------------------------------------------------------------------
    def encode_images(
        self,
        *,
        pixel_values: torch.Tensor | None = None,
        image_encoder_embeddings: torch.Tensor | None = None,
        perceiver_embeddings: torch.Tensor | None = None,
        num_images: int | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """Exactly one input -> the states the gated layers attend to (b, n, s, d_img).

        pixel_values (b, n, 3, r, r); image_encoder_embeddings (b, n, 1 + patches, d_img) or (b*n, 1 + patches,
        d_img); perceiver_embeddings (b, n, latents, d_img) or (b*n, latents, d_img). The 3D forms need `num_images`.
        """
        given = [x is not None for x in (pixel_values, image_encoder_embeddings, perceiver_embeddings)]
        if sum(given) != 1:
            raise ValueError(
                f"pass exactly one of pixel_values, image_encoder_embeddings, perceiver_embeddings (got {sum(given)})"
            )
        if perceiver_embeddings is not None:
            if not self.config.use_resampler:
                raise ValueError(
                    "perceiver_embeddings were passed but this model has no resampler (use_resampler=False)"
                )
            states = perceiver_embeddings
        else:
            if pixel_values is not None:
                if pixel_values.ndim != 5:
                    raise ValueError(
                        f"pixel_values must be (batch, images, 3, height, width), got {tuple(pixel_values.shape)}"
                    )
                num_images = pixel_values.shape[1]
                images = pixel_values.flatten(0, 1).to(self.dtype)  # (b*n, 3, r, r)
                states = self.vision_model(
                    images, interpolate_pos_encoding=interpolate_pos_encoding
                )  # (b*n, 1+p, d_img)
            else:
                states = image_encoder_embeddings
            if states.ndim == 4:
                num_images = states.shape[1]
                states = states.flatten(0, 1)
            if self.config.use_resampler:
                states = self.perceiver_resampler(states)  # (b*n, latents, d_img)
        if states.ndim == 4:
            return states
        if num_images is None:
            raise ValueError(
                "3D image embeddings (batch*images, tokens, dim) need an image_attention_mask to split them"
            )
        return states.view(-1, num_images, *states.shape[1:])  # (b, n, s, d_img)

    def project_images(self, image_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(b, n, s, d_img) -> each gated layer's image keys and values (b, h, n*s, hd).

        An image that appears more than once in the batch (few-shot prompts sharing support images, several questions
        about one image, padding) is projected once: each row of a projection depends only on its own input row."""
        b, n, s, _ = image_states.shape
        images = image_states.flatten(0, 1).to(self.dtype)  # (b*n, s, d_img)
        first, inverse = distinct_rows(images)
        if len(first) == b * n:
            flat = images.view(b, n * s, -1)  # (b, n*s, d_img)
            return [layer.cross_attn.project_image(flat) for layer in self.gated_cross_attn_layers]
        unique = images[torch.tensor(first, device=images.device)].flatten(0, 1)[None]  # (1, u*s, d_img)
        index = torch.tensor(inverse, device=images.device)
        out = []
        for layer in self.gated_cross_attn_layers:
            pair = []
            for x in layer.cross_attn.project_image(unique):  # (1, h, u*s, hd)
                x = x.view(x.shape[1], len(first), s, x.shape[-1]).index_select(1, index)  # (h, b*n, s, hd)
                pair.append(x.view(x.shape[0], b, n * s, x.shape[-1]).transpose(0, 1))  # (b, h, n*s, hd)
            out.append((pair[0], pair[1]))
        return out

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: IdeficsCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_encoder_embeddings: torch.Tensor | None = None,
        perceiver_embeddings: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        interpolate_pos_encoding: bool = False,
        *,
        cache: IdeficsCache | None = None,
    ) -> IdeficsModelOutput:
        """Run the backbone on t new tokens (after whatever `past_key_values` holds).

        input_ids (b, t) or inputs_embeds (b, t, d); attention_mask (b, past + t) with 0 on padding; image inputs as
        in `encode_images`; image_attention_mask (b, t, n), 1 where a token may attend to an image. With a cache that
        already holds a request's images, image inputs are ignored and a missing image_attention_mask repeats the
        last token's row. With no image input at all, every token attends to no image.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = past_key_values if past_key_values is not None else cache
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, d)
        b, t, _ = x.shape
        if cache is None and (use_cache if use_cache is not None else False):
            cache = self.new_cache(batch_size=b, capacity=t)
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask must be (batch, past + new) = {(b, past + t)}, got {tuple(attention_mask.shape)}"
            )

        # Images: from the cache when the request already encoded them, else encoded (and cached) now.
        image_kv, image_states = (cache.image_kv, cache.image_hidden_states) if cache is not None else (None, None)
        if image_kv is None and any(
            x is not None for x in (pixel_values, image_encoder_embeddings, perceiver_embeddings)
        ):
            image_states = self.encode_images(
                pixel_values=pixel_values,
                image_encoder_embeddings=image_encoder_embeddings,
                perceiver_embeddings=perceiver_embeddings,
                num_images=image_attention_mask.shape[-1] if image_attention_mask is not None else None,
                interpolate_pos_encoding=interpolate_pos_encoding,
            )
            # Projected once here only for a cache that reuses them at every decoding step; otherwise each gated
            # layer projects them inside its own call (a checkpointed layer then recomputes them and gradients flow;
            # an FSDP-sharded layer has its weights gathered only during its call).
            caching = cache is not None and not (self.training and torch.is_grad_enabled())
            image_kv = self.project_images(image_states) if caching else None
            if cache is not None:
                cache.image_kv, cache.image_hidden_states = image_kv, image_states
        cross_mask = gate = None
        if image_states is not None:
            n, s = image_states.shape[1:3]
            if image_attention_mask is None:
                if cache is None or cache.last_image_mask is None:
                    raise ValueError("image_attention_mask (batch, text, images) is required when images are given")
                image_attention_mask = cache.last_image_mask[:, None, :].expand(b, t, n)
            if image_attention_mask.shape != (b, t, n):
                raise ValueError(
                    f"image_attention_mask must be (batch, text, images) = {(b, t, n)}, "
                    f"got {tuple(image_attention_mask.shape)}"
                )
            cross_mask, gate = image_masks(image_attention_mask, s)
            if cache is not None:
                cache.last_image_mask = image_attention_mask[:, -1]

        if position_ids is None:
            position_ids = position_ids_from(attention_mask, t, past, x.device)
        rope = self.rotary_emb(position_ids, x.dtype)  # (b, t, 1, hd) x2
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        mask = causal_mask(attention_mask, t, past)

        x = self.run_layers(
            x, rope, mask, cache.kv if cache is not None else None, image_states, image_kv, cross_mask, gate
        )
        if cache is not None:
            cache.kv.advance(t)
        return IdeficsModelOutput(
            last_hidden_state=self.norm(x), past_key_values=cache, image_hidden_states=image_states
        )

    def run_layers(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv: KVCache | None,
        image_states: torch.Tensor | None,
        image_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
        cross_mask: torch.Tensor | None,
        gate: torch.Tensor | None,
    ) -> torch.Tensor:
        """The decoder stack on x (b, t, d), each gated layer before its decoder layer; no final norm.

        With `image_kv` the gated layers use those precomputed image keys/values; with only `image_states` they
        project them (training, so gradients reach the vision side); with neither no token sees an image.
        """
        interval = self.config.cross_layer_interval
        if gate is not None:
            gate = gate.unsqueeze(-1).to(x.dtype)  # (b, t, 1), once for every gated layer
        for i, layer in enumerate(self.layers):
            if i % interval == 0:
                gated = self.gated_cross_attn_layers[i // interval]
                if image_kv is not None:
                    x = self._run(gated, x, image_kv[i // interval], cross_mask, gate)
                elif image_states is not None:  # projected inside the layer (its own call, for FSDP and checkpointing)
                    x = self._run(gated, x, image_states, cross_mask, gate)
                else:
                    x = self._run(gated, x, None, None, None)
            # The layer index matters only with a cache; leaving it out otherwise lets one compiled graph serve
            # every layer (torch.compile specialises on int arguments).
            x = self._run(layer, x, rope, mask, kv, i) if kv is not None else self._run(layer, x, rope, mask)
        return x

    @property
    def num_heads(self) -> int:
        """Attention heads this process computes (and caches): all of them, or its share under tensor parallelism."""
        return self.layers[0].self_attn.num_heads

    def new_cache(self, *, batch_size: int, capacity: int) -> IdeficsCache:
        """An empty cache for `batch_size` rows with room for `capacity` positions (it grows if needed)."""
        c = self.config
        kv = KVCache(
            num_layers=c.num_hidden_layers,
            batch_size=batch_size,
            num_heads=self.num_heads,
            head_dim=c.head_dim,
            capacity=capacity,
            dtype=self.dtype,
            device=self.device,
        )
        return IdeficsCache(kv)


class IdeficsForVisionText2Text(PretrainedMixin, nn.Module):
    """IDEFICS with its decoupled LM head: logits over the regular and the additional vocabulary.

    `generate` and the LoRA adapter methods (`add_adapter`, `load_adapter`, ...) are attached by idefics/methods.py:
    they belong to the layers above the model core."""

    checkpoint_prefix = ""

    def __init__(self, config: IdeficsConfig):
        super().__init__()
        self.config = config
        self.model = IdeficsModel(config)
        self.lm_head = IdeficsDecoupledLinear(
            config.hidden_size, config.vocab_size, config.additional_vocab_size, frozen=config.freeze_lm_head
        )
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head's rows with the embedding table (only when `tie_word_embeddings`)."""
        self.lm_head.weight = self.model.embed_tokens.weight
        if self.config.additional_vocab_size:
            self.lm_head.additional_fc.weight = self.model.embed_tokens.additional_embedding.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: IdeficsCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_encoder_embeddings: torch.Tensor | None = None,
        perceiver_embeddings: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        interpolate_pos_encoding: bool = False,
        logits_to_keep: int = 0,
        *,
        cache: IdeficsCache | None = None,
        return_logits: bool = True,
        loss_reduction: str = "mean",
    ) -> IdeficsCausalLMOutput:
        """`IdeficsModel.forward` plus logits (b, t, v) and, with labels (b, t), the shifted full-vocabulary loss.

        `logits_to_keep=k` > 0 computes logits for the last k positions only. For training, `return_logits=False`
        (with labels) applies the LM head only at labelled positions and returns no logits; `loss_reduction="sum"`
        sums the token losses instead of averaging them.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels: it computes the loss alone")
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            pixel_values,
            image_encoder_embeddings,
            perceiver_embeddings,
            image_attention_mask,
            use_cache,
            interpolate_pos_encoding,
            cache=cache,
        )
        hidden = out.last_hidden_state
        if return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (b, t, v)
            loss = causal_lm_loss(logits, labels, reduction=loss_reduction) if labels is not None else None
        else:
            logits, loss = None, labelled_lm_loss(self.lm_head, hidden, labels, reduction=loss_reduction)
        return IdeficsCausalLMOutput(
            logits=logits,
            loss=loss,
            past_key_values=out.past_key_values,
            image_hidden_states=out.image_hidden_states,
            last_hidden_state=hidden,
        )
