"""Configuration of MiniMind-3 (dense and MoE), the original project's current generation, with its defaults.

MiniMind-3 is a Qwen3-shaped decoder: QK-norm, an explicit `head_dim`, an optional untied LM head, and a
Qwen3-MoE-style feed-forward (no shared experts). It has its own `model_type` ("minimind3") so that a saved model
reloads as the generation it is. The original's own configs still say `model_type: "minimind"`: they are told
apart by their fields (`minimind_generation`), and `MiniMindConfig.from_dict` hands a MiniMind-3 one to this class.
"""

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# Fields only one generation's config has (the original's MiniMind2 and MiniMind-3 config classes).
MINIMIND3_ONLY_FIELDS = frozenset({"head_dim", "num_experts", "moe_intermediate_size", "router_aux_loss_coef"})
MINIMIND2_ONLY_FIELDS = frozenset({"n_routed_experts", "n_shared_experts", "scoring_func", "aux_loss_alpha", "seq_aux"})

# The original's YaRN for `inference_rope_scaling=True`: 16x over 2048 positions, cos/sin not rescaled.
MINIMIND3_YARN: dict[str, Any] = {
    "rope_type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 2048,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
}


def minimind_generation(config_dict: dict[str, Any]) -> int:
    """2 or 3: which MiniMind generation a config dict describes.

    Our own saves say so by `model_type`; the original's both say "minimind", so their fields decide. A dict
    with fields of both generations is refused rather than guessed.
    """
    if config_dict.get("model_type") == MiniMind3Config.model_type:
        return 3
    keys = set(config_dict)
    m3, m2 = sorted(keys & MINIMIND3_ONLY_FIELDS), sorted(keys & MINIMIND2_ONLY_FIELDS)
    if m3 and m2:
        raise ValueError(f"a MiniMind config with both MiniMind-3 fields {m3} and MiniMind2 fields {m2}")
    return 3 if m3 else 2


@strict
class MiniMind3Config(PreTrainedConfig):
    r"""MiniMind-3: Qwen3's architecture with MiniMind's sizes and an optional Qwen3-MoE feed-forward.

    The defaults are `minimind-3` (64M). `use_moe=True` is `minimind-3-moe` (4 experts, top-1).
    `intermediate_size=None` resolves to `ceil(hidden_size * pi / 64) * 64` (2432 at 768), `head_dim=None` to
    `hidden_size // num_attention_heads`, `moe_intermediate_size=None` to `intermediate_size`.
    `inference_rope_scaling=True` sets the original's YaRN (factor 16 over 2048 positions) in `rope_parameters`.

    ```python
    >>> from minimind_hf import MiniMind3Config, MiniMind3ForCausalLM
    >>> model = MiniMind3ForCausalLM(MiniMind3Config(hidden_size=256, num_hidden_layers=4))
    ```
    """

    model_type = "minimind3"
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 1_000_000.0

    vocab_size: int = 6400
    hidden_size: int = 768
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    dropout: float = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    inference_rope_scaling: bool = False
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 5e-4

    def __post_init__(self, **kwargs):
        # The original's HF export writes `rope_scaling` (its YaRN dict, or null); `inference_rope_scaling` says it.
        kwargs.pop("rope_scaling", None)
        if not self.use_moe and kwargs.get("output_router_logits"):
            # TRL's SFTTrainer saves `output_router_logits: true` into dense configs too (its balance loss follows
            # `router_aux_loss_coef`); TRL's fused LM head then asks a dense model for router logits, and the
            # balance loss fails on the empty tuple. A dense model has no router: it reads as false.
            kwargs["output_router_logits"] = False
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.inference_rope_scaling and (self.rope_parameters or {}).get("rope_type", "default") == "default":
            theta = kwargs.pop("rope_theta", (self.rope_parameters or {}).get("rope_theta", self.default_theta))
            self.rope_parameters = {**MINIMIND3_YARN, "rope_theta": theta}
        super().__post_init__(**kwargs)

    # transformers' Qwen3 modules read these names; MiniMind-3 has no biases and one dropout rate.
    @property
    def attention_dropout(self) -> float:
        return self.dropout

    @property
    def attention_bias(self) -> bool:
        return False

    def validate_architecture(self):
        """Checked by `@strict` on construction: sizes that cannot build a model fail here, not mid-forward."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "moe_intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"MiniMind3Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.use_moe and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})"
            )


__all__ = ["MiniMind3Config", "minimind_generation"]
