"""MiniMind as a transformers model.

Everything MiniMind shares with Llama (RMSNorm, rotary embedding, grouped-query attention through the shared
attention interface, the SwiGLU MLP) is transformers' own Llama code. What is written here is only what
differs: dropout where MiniMind has it, the DeepSeek-style MoE block with shared experts, and its sequence-level
balance loss. This file imports nothing from `minimind_hf` but its config, so `save_pretrained` can ship it as
remote code for a Python that has transformers but not this package.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_minimind import MiniMindConfig


class MiniMindRouter(nn.Module):
    """Softmax gate over the routed experts; its weight is the original's `mlp.gate.weight`."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)
        scores = router_logits.float().softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, topk_weight, topk_idx


class MiniMindMoE(nn.Module):
    """Routed experts weighted by the gate, plus shared experts that every token goes through."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.gate = MiniMindRouter(config)
        self.experts = nn.ModuleList([LlamaMLP(config) for _ in range(config.n_routed_experts)])
        self.shared_experts = nn.ModuleList([LlamaMLP(config) for _ in range(config.n_shared_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, topk_weight, topk_idx = self.gate(flat)
        routed = torch.zeros_like(flat)
        for expert_idx, expert in enumerate(self.experts):
            token_idx, slot = torch.where(topk_idx == expert_idx)
            # An expert that got no token still runs on an empty batch, so its parameters stay in the
            # autograd graph and DDP needs no `find_unused_parameters`.
            out = expert(flat[token_idx]) * topk_weight[token_idx, slot, None].to(flat.dtype)
            routed.index_add_(0, token_idx, out.to(routed.dtype))
        for expert in self.shared_experts:
            routed = routed + expert(flat)
        return routed.view(shape)


def moe_aux_loss(router_logits: tuple[torch.Tensor, ...], batch_size: int, config: MiniMindConfig) -> torch.Tensor:
    """MiniMind's balance loss, summed over MoE layers.

    `seq_aux` scores balance within each sequence (row) of the batch, as the original does; padding and
    packed neighbours count like any other token there, also as in the original.
    """
    n_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        scores = logits.float().softmax(dim=-1)
        topk_idx = torch.topk(scores, top_k, dim=-1, sorted=False).indices
        if config.seq_aux:
            seq_len = scores.shape[0] // batch_size
            counts = scores.new_zeros(batch_size, n_experts)
            counts.scatter_add_(1, topk_idx.view(batch_size, -1), scores.new_ones(batch_size, seq_len * top_k))
            load = counts / (seq_len * top_k / n_experts)
            total = total + (load * scores.view(batch_size, seq_len, n_experts).mean(dim=1)).sum(dim=1).mean()
        else:
            load = F.one_hot(topk_idx.reshape(-1), n_experts).float().mean(dim=0) * n_experts
            total = total + (scores.mean(dim=0) * load).sum()
    return total * config.aux_loss_alpha


class MiniMindDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = MiniMindMoE(config) if config.use_moe else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # MiniMind drops out the attention and MLP outputs before each residual add; Llama has no such dropout.
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


class MiniMindPreTrainedModel(PreTrainedModel):
    config: MiniMindConfig
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False  # the MoE expert loop is data-dependent
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(MiniMindRouter, index=0),
        "hidden_states": MiniMindDecoderLayer,
        "attentions": LlamaAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MiniMindRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class MiniMindModel(MiniMindPreTrainedModel):
    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            [MiniMindDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
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


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
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

        For an MoE config in training mode the balance loss is always computed (as in MiniMind): it is added
        to the language-model loss and also returned alone as `aux_loss`, so it can be logged.
        """
        wants_aux = self.config.use_moe and self.training and self.config.aux_loss_alpha > 0
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
            aux_loss = moe_aux_loss(outputs.router_logits, outputs.last_hidden_state.shape[0], self.config)
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


__all__ = ["MiniMindForCausalLM", "MiniMindModel", "MiniMindPreTrainedModel"]
