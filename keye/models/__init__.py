"""Keye models. Importing this registers them with the transformers Auto classes (no remote code)."""

from transformers import AutoConfig, AutoModelForImageTextToText

from keye.models.configuration import KeyeConfig, KeyeProjectorConfig, KeyeVisionConfig, KeyeVisualTokenizerConfig
from keye.models.modeling import KeyeForConditionalGeneration, discrete_from_continuous
from keye.models.variants import VARIANTS, build_config, build_model

AutoConfig.register(KeyeConfig.model_type, KeyeConfig, exist_ok=True)
AutoConfig.register(KeyeVisionConfig.model_type, KeyeVisionConfig, exist_ok=True)
AutoConfig.register(KeyeProjectorConfig.model_type, KeyeProjectorConfig, exist_ok=True)
AutoConfig.register(KeyeVisualTokenizerConfig.model_type, KeyeVisualTokenizerConfig, exist_ok=True)
AutoModelForImageTextToText.register(KeyeConfig, KeyeForConditionalGeneration, exist_ok=True)

__all__ = [
    "KeyeConfig",
    "KeyeForConditionalGeneration",
    "KeyeProjectorConfig",
    "KeyeVisionConfig",
    "KeyeVisualTokenizerConfig",
    "VARIANTS",
    "build_config",
    "build_model",
    "discrete_from_continuous",
]

# The processor lives in keye.processing (it consumes keye.video types); registering it here makes
# AutoProcessor.from_pretrained work on any saved Keye checkpoint after `import keye.models`.
from transformers import AutoProcessor  # noqa: E402

from keye.processing import KeyeProcessor  # noqa: E402

AutoProcessor.register(KeyeConfig, KeyeProcessor, exist_ok=True)
__all__.append("KeyeProcessor")
