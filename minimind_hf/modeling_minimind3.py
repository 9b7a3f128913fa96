"""MiniMind-3 as a transformers model.

MiniMind-3's forward pass is Qwen3's (dense) or Qwen3-MoE's (MoE): attention with QK-norm, RMSNorm, rotary
embedding, SwiGLU MLP, the softmax top-k router with renormalised weights and the fused experts
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) are all transformers' own modules. What is written here is only
what differs: one model for both feed-forward kinds, MiniMind's dropout, and the original's router balance loss
(summed over layers, padding counted), which is not Qwen3-MoE's. This file imports nothing from `minimind_hf` but
its config, so `save_pretrained` can ship it as remote code.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation import GenerationMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeExperts,
    Qwen3MoeSparseMoeBlock,
    Qwen3MoeTopKRouter,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_minimind3 import MiniMind3Config

# The original's checkpoints (its HF export, like its .pth) keep one `{gate,up,down}_proj` per expert. transformers'
# Qwen2/3-MoE conversion fuses them on load and splits them again on save, so an MoE directory written here has the
# original's layout too; fused checkpoints load unchanged. Registered here so that remote code gets it as well.
register_checkpoint_conversion_mapping(
    MiniMind3Config.model_type, get_checkpoint_conversion_mapping("qwen2_moe"), overwrite=True
)


def minimind3_aux_loss(router_logits: tuple[torch.Tensor, ...], config: MiniMind3Config) -> torch.Tensor:
    """The original's router balance loss: per MoE layer `coef * E * sum_i f_i * P_i`, the layers' terms summed.

    `P_i` is expert i's mean router probability over every token of the batch (padding included, as in the
    original) and `f_i` the share of tokens choosing i, summed over the k choice slots. transformers'
    `load_balancing_loss_func` concatenates the layers and divides by top-k instead, which is another value.
    """
    n_experts, top_k = config.num_experts, config.num_experts_per_tok
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        topk_idx = torch.topk(probs, top_k, dim=-1).indices
        load = F.one_hot(topk_idx, n_experts).float().mean(dim=0).sum(dim=0)  # [E]: summed over the k slots
        total = total + (load * probs.mean(dim=0)).sum() * n_experts
    return total * config.router_aux_loss_coef


class _ExpertsIn:
    """The experts module seen with its two weights cast to `dtype` (autograd flows back through the casts)."""

    def __init__(self, experts: nn.Module, dtype: torch.dtype):
        self._experts = experts
        self.gate_up_proj = experts.gate_up_proj.to(dtype)
        self.down_proj = experts.down_proj.to(dtype)

    def __getattr__(self, name: str):
        return getattr(self._experts, name)


def autocast_grouped_mm_experts(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' `grouped_mm` experts (tokens sorted by expert, two grouped GEMMs over all experts at once), run
    in the autocast dtype when autocast is on.

    `torch._grouped_mm` is not an autocast op, so under bf16 autocast the plain `grouped_mm` implementation would
    multiply in float32 (8x slower than bf16 on a CPU with AMX), while the eager per-expert loop's `F.linear` calls
    do get bf16. Casting the inputs and weights here gives the grouped kernels the precision the loop had: bf16
    products, routing weights applied in float32 and the output in bf16, like the dense MLP's under autocast.
    """
    device_type = hidden_states.device.type
    if not torch.is_autocast_enabled(device_type):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return grouped_mm_experts_forward(
            _ExpertsIn(self, dtype), hidden_states.to(dtype), top_k_index, top_k_weights.float()
        )


# The default experts implementation of MiniMind-3 (see `MiniMind3PreTrainedModel.get_correct_experts_implementation`).
ALL_EXPERTS_FUNCTIONS.register("minimind_grouped_mm", autocast_grouped_mm_experts)


class MiniMind3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniMind3Config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen3Attention(config=config, layer_idx=layer_idx)
        # Qwen3-MoE's block: its fused experts keep every expert in one parameter, so an expert no token chose
        # still gets a (zero) gradient and DDP needs no `find_unused_parameters`.
        self.mlp = Qwen3MoeSparseMoeBlock(config) if config.use_moe else Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # MiniMind drops out the attention and MLP outputs before each residual add; Qwen3 has no such dropout.
        self.resid_dropout = nn.Dropout(config.dropout)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states + self.resid_dropout(attn_output)
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.resid_dropout(mlp_output)


class MiniMind3PreTrainedModel(PreTrainedModel):
    config: MiniMind3Config
    config_class = MiniMind3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMind3DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # the eager expert loop (experts_implementation="eager") is data-dependent
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(Qwen3MoeTopKRouter, index=0),
        "hidden_states": MiniMind3DecoderLayer,
        "attentions": Qwen3Attention,
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for `@use_experts_implementation` in this module's source; the experts are Qwen3-MoE's,
        # which carry it. Without this the MoE would silently run the eager per-expert loop.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Default: the grouped GEMMs in the autocast dtype (2x the eager loop's speed on a CPU, and traceable by
        # torch.compile); "eager", "grouped_mm", "batched_mm" stay available through `experts_implementation`.
        return super().get_correct_experts_implementation(requested_experts or "minimind_grouped_mm")

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Qwen3MoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Qwen3MoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)


class MiniMind3Model(MiniMind3PreTrainedModel):
    def __init__(self, config: MiniMind3Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            [MiniMind3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # A cache built in training would only disable the packed-sequence masks below; nobody reads it.
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # With no attention_mask and position_ids that restart at 0, masking_utils builds a block-diagonal
        # causal mask per row: that is how packed sequences stay apart.
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = self.dropout(inputs_embeds)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class MiniMind3ForCausalLM(MiniMind3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MiniMind3Config):
        super().__init__(config)
        self.model = MiniMind3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""Causal-LM forward. `labels` use -100 for unsupervised positions and are shifted inside.

        As for MiniMind2's MoE in this package: in training mode an MoE model always computes the router balance
        loss, adds it to the language-model loss and also returns it alone as `aux_loss` (the trainers compute
        their own LM loss and add `aux_loss` to it).
        """
        wants_aux = self.config.use_moe and self.training and self.config.router_aux_loss_coef > 0
        if output_router_logits is None:
            output_router_logits = wants_aux
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits and self.config.use_moe,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = None
        if wants_aux:
            aux_loss = minimind3_aux_loss(outputs.router_logits, self.config)
            if loss is not None:
                loss = loss + aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )


__all__ = ["MiniMind3ForCausalLM", "MiniMind3Model", "MiniMind3PreTrainedModel", "minimind3_aux_loss"]
