"""minimind-hf: MiniMind2 and MiniMind-3 (dense and MoE) as Hugging Face models, trained with TRL.

Importing the package registers the model with `AutoConfig` / `AutoModelForCausalLM`, and marks the classes
for `register_for_auto_class` so that `save_pretrained` also writes remote code: a saved checkpoint then
loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_minimind import MiniMindConfig
from .configuration_minimind3 import MiniMind3Config
from .modeling_minimind import MiniMindForCausalLM, MiniMindModel
from .modeling_minimind3 import MiniMind3ForCausalLM, MiniMind3Model

AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
MiniMindConfig.register_for_auto_class()
MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(MiniMind3Config.model_type, MiniMind3Config, exist_ok=True)
AutoModelForCausalLM.register(MiniMind3Config, MiniMind3ForCausalLM, exist_ok=True)
MiniMind3Config.register_for_auto_class()
MiniMind3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "MiniMind3Config",
    "MiniMind3ForCausalLM",
    "MiniMind3Model",
    "MiniMindConfig",
    "MiniMindForCausalLM",
    "MiniMindModel",
]
