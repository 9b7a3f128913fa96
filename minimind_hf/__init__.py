"""minimind-hf: MiniMind (dense and MoE) as a Hugging Face model, trained with TRL.

Importing the package registers the model with `AutoConfig` / `AutoModelForCausalLM`, and marks the classes
for `register_for_auto_class` so that `save_pretrained` also writes remote code: a saved checkpoint then
loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_minimind import MiniMindConfig
from .modeling_minimind import MiniMindForCausalLM, MiniMindModel

AutoConfig.register(MiniMindConfig.model_type, MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)
MiniMindConfig.register_for_auto_class()
MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "MiniMindModel"]
