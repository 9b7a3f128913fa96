"""Configuration of MiniMind (dense and MoE), with the original project's defaults."""

import difflib
import json
import math
from collections.abc import Iterable
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .configuration_minimind3 import MiniMind3Config, minimind_generation


@strict
class MiniMindConfig(PreTrainedConfig):
    r"""MiniMind: a Llama-shaped decoder with tied embeddings and an optional DeepSeek-style MoE.

    The defaults are MiniMind2-Small (26M parameters). `hidden_size=768, num_hidden_layers=16` is the 104M
    "base" model and `hidden_size=640, use_moe=True` the 145M MoE.

    `intermediate_size=None` resolves to `64 * ceil(int(hidden_size * 8 / 3) / 64)` (1408 for 512).
    `rope_theta` may be passed as a keyword: like every transformers config it is folded into
    `rope_parameters`. `inference_rope_scaling=True` extends the context with transformers' YaRN
    (factor 4 over 2048 positions); the original's YaRN variant is close to, not bit-equal with, it.

    ```python
    >>> from minimind_hf import MiniMindConfig, MiniMindForCausalLM
    >>> model = MiniMindForCausalLM(MiniMindConfig(hidden_size=256, num_hidden_layers=4))
    ```
    """

    model_type = "minimind"
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 1_000_000.0
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
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
    n_routed_experts: int = 4
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.1
    seq_aux: bool = True
    norm_topk_prob: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(int(self.hidden_size * 8 / 3) / 64)
        if self.inference_rope_scaling and self.rope_parameters is None:
            self.rope_parameters = {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 2048,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            }
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PreTrainedConfig:
        """The original's MiniMind-3 config also says `model_type: "minimind"`: recognised by its fields, it
        becomes a `MiniMind3Config` (and so loads as `MiniMind3ForCausalLM`), its remote-code `auto_map` dropped."""
        if cls is MiniMindConfig and minimind_generation(config_dict) == 3:
            drop = ("model_type", "auto_map")
            return MiniMind3Config.from_dict({k: v for k, v in config_dict.items() if k not in drop}, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # transformers' Llama modules read these names; MiniMind has no biases and one dropout rate.
    @property
    def attention_dropout(self) -> float:
        return self.dropout

    @property
    def attention_bias(self) -> bool:
        return False

    @property
    def mlp_bias(self) -> bool:
        return False

    def validate_architecture(self):
        """Checked by `@strict` on construction: sizes that cannot build a model fail here, not mid-forward."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"MiniMindConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim (hidden_size / num_attention_heads = {self.head_dim}) must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.use_moe:
            if self.scoring_func != "softmax":
                raise ValueError(
                    f"scoring_func must be 'softmax' (the only one MiniMind has), got {self.scoring_func!r}"
                )
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                    f"({self.n_routed_experts})"
                )
            if self.n_shared_experts < 0:
                raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")


__all__ = ["MiniMindConfig"]


# Building a config from the sizes a recipe or command line gives, plus other fields by name ("k=v,...").
# `rope_theta` is accepted besides the dataclass fields: transformers folds it into `rope_parameters`.
EXTRA_CONFIG_FIELDS = frozenset({"rope_theta"})


def _known_fields(minimind_version: int | None) -> set[str]:
    """Config fields of one generation, or of either when the generation is not known yet (a `.pth`, say)."""
    classes = {2: [MiniMindConfig], 3: [MiniMind3Config]}.get(minimind_version, [MiniMindConfig, MiniMind3Config])
    return {name for cls in classes for name in cls.__dataclass_fields__} | EXTRA_CONFIG_FIELDS


def unknown_config_fields(keys: Iterable[str], minimind_version: int | None = 2) -> list[str]:
    """The keys, in their order, that name no config field of the generation: the one check of override names."""
    known = _known_fields(minimind_version)
    return [key for key in keys if key not in known]


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse `"num_attention_heads=4,rms_norm_eps=1e-6"` into typed values (JSON literals, else strings)."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not of the form key=value")
        try:
            value = json.loads(raw.strip())
        except json.JSONDecodeError:
            value = raw.strip()
        overrides[key.strip()] = value
    return overrides


def config_overrides_problem(text: str, minimind_version: int | None = None) -> str | None:
    """Why `config_overrides` ("k=v,...") cannot apply, or None. Checked for every model source: a directory's
    loader compares the overrides with its config and would pass over a misspelt field unseen."""
    try:
        overrides = parse_overrides(text)
    except ValueError as err:
        return str(err)
    unknown = unknown_config_fields(overrides, minimind_version)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_known_fields(minimind_version)), n=1)
        return f"unknown MiniMindConfig field '{unknown[0]}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    return None


# The original's sizes for a fresh model of each generation when a recipe gives none (MiniMind2: 512 x 8).
DEFAULT_SIZES = {2: {"hidden_size": 512, "num_hidden_layers": 8, "use_moe": False}, 3: {}}


def build_config(
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    use_moe: bool | None = None,
    overrides: dict[str, Any] | None = None,
    minimind_version: int = 2,
) -> MiniMindConfig | MiniMind3Config:
    """The config MiniMind builds from its three size arguments, plus any other field by name, of either
    generation (2: MiniMind2, the seed's; 3: MiniMind-3, the original's current one, with its own defaults)."""
    if minimind_version not in (2, 3):
        raise ValueError(f"minimind_version must be 2 or 3, got {minimind_version!r}")
    overrides = dict(overrides or {})
    unknown = sorted(unknown_config_fields(overrides, minimind_version))
    if unknown:
        raise ValueError(
            f"unknown MiniMind{'-3' if minimind_version == 3 else ''}Config field(s): {', '.join(unknown)}"
        )
    sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "use_moe": use_moe}
    sizes = {**DEFAULT_SIZES[minimind_version], **{k: v for k, v in sizes.items() if v is not None}}
    if "use_moe" in sizes:
        sizes["use_moe"] = bool(sizes["use_moe"])
    config_class = MiniMind3Config if minimind_version == 3 else MiniMindConfig
    return config_class(**sizes, **overrides)


__all__ += ["build_config", "config_overrides_problem", "parse_overrides", "unknown_config_fields"]
