"""Keye configs: a vision config, a projector config and a transformers text config in one model config.

Field names follow the published Keye-VL-1.5 ``config.json`` where one exists (``vision_config`` is
SigLIP-shaped, ``image_token_id`` / ``video_token_id`` are the Qwen ids), so a published config maps
onto these classes with few renames (see ``keye.models.adapter``).
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from keye.errors import ConfigError


class KeyeVisionConfig(PreTrainedConfig):
    """SigLIP-style native-resolution ViT (Keye-VL-1.5 uses SigLIP-so400m-patch14-384).

    ``image_size // patch_size`` is the side of the learned position table (27 for 384 / 14), which
    is interpolated bilinearly to every image's own patch grid.
    """

    model_type = "keye_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    # The published checkpoint carries a 32768-row `packing_position_embedding` that the 1.5 forward
    # never reads (it interpolates `position_embedding` instead); we keep it, frozen, so checkpoints
    # load and save without renames. 0 leaves it out.
    packing_position_embeddings: int = 32768
    initializer_range: float = 0.02
    # Each video frame's patches also see their difference from the same patches one sampled frame earlier,
    # through a second patch embedding (``difference_embedding``, zero at the start so turning it on changes
    # no output): a token can then carry which way the object under it moves, which one frame cannot show.
    # Not in Keye-VL-1.5 (its frames are encoded alone); images and a video's first frame see no difference.
    frame_difference: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ConfigError("vision_config: head_dim must be a multiple of 4 for the 2D (h, w) RoPE")

    @property
    def position_grid(self) -> int:
        return self.image_size // self.patch_size


class KeyeProjectorConfig(PreTrainedConfig):
    """The ``mlp_AR`` projector of Keye-VL-1.5: 2x2 merge -> LayerNorm -> Linear -> GELU -> Linear."""

    model_type = "keye_projector"
    base_config_key = "projector_config"

    merge_size: int = 2
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"


class KeyeVisualTokenizerConfig(PreTrainedConfig):
    """Kelix-style discrete visual tokenizer over the 2x2-merged ViT features (``keye.models.visual_tokenizer``).

    ``num_codebooks`` parallel codebooks each quantize their own ``code_dim`` slice of the encoder's
    latent (product quantization), so one merged token carries ``num_codebooks`` codes of
    ``log2(codebook_size)`` bits each. Each code is a frozen vector through a trainable linear map (SimVQ).
    """

    model_type = "keye_visual_tokenizer"
    base_config_key = "visual_tokenizer_config"

    num_codebooks: int = 8
    codebook_size: int = 8192
    code_dim: int = 32  # per codebook; the latent is num_codebooks * code_dim wide
    hidden_size: int = 2048  # encoder / decoder MLP width
    layer_norm_eps: float = 1e-6
    commitment_weight: float = 0.25  # beta of VQ-VAE (van den Oord et al. 2017, eq. 3)
    codebook_weight: float = 1.0
    reconstruction_cosine_weight: float = 1.0
    reconstruction_mse_weight: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("num_codebooks", "codebook_size", "code_dim", "hidden_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"visual_tokenizer_config: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_codes(self) -> int:
        """Rows of the reserved LM-vocabulary block: one per (codebook, code)."""
        return self.num_codebooks * self.codebook_size


# How visual features reach the LM: ViT -> mlp_AR (Keye-VL), or ViT -> visual tokenizer -> summed code
# embeddings (Kelix). ``keye.models.modeling.VISION_PATHS`` holds one function per mode.
VISION_MODES = ("continuous", "discrete")


class KeyeConfig(PreTrainedConfig):
    """Keye vision-language model config.

    ``text_config`` is a transformers ``Qwen3Config`` (Keye-VL-1.5-8B) or ``Qwen3MoeConfig``
    (Keye-VL-2.0 / keye-nano); the decoder is built from it with transformers' own classes.
    ``vision_mode`` picks the visual path (``VISION_MODES``); ``visual_tokenizer_config`` sizes the
    discrete one and is inert in continuous mode. ``mrope_section`` splits the text RoPE half-dim between
    (t, h, w) as in Qwen2.5-VL; the published 1.5 config uses [16, 24, 24] for head_dim 128, in contiguous
    sections (``mrope_interleaved`` false; Qwen3-VL interleaves them). RoPE scaling (``rope_scaling`` type and
    factor in a published config) lives in ``text_config.rope_parameters``, where transformers reads it.
    """

    model_type = "keye"
    sub_configs_defaults = {
        "vision_config": KeyeVisionConfig,
        "projector_config": KeyeProjectorConfig,
        "visual_tokenizer_config": KeyeVisualTokenizerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3_moe"),
    }
    keys_to_ignore_at_inference = ["past_key_values"]

    vision_config: dict | PreTrainedConfig | None = None
    projector_config: dict | PreTrainedConfig | None = None
    visual_tokenizer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    mrope_section: list | None = None
    # Qwen3-VL's interleaved mRoPE layout (``KeyeMRotaryEmbedding``) instead of Keye-VL-1.5's contiguous one
    mrope_interleaved: bool = False
    # ST-MoE router z-loss (Zoph et al. 2022, eq. 5); off by default, the load-balancing loss is on.
    router_z_loss_coef: float = 0.0
    tie_word_embeddings: bool = False
    # "continuous" (ViT features through mlp_AR) or "discrete" (visual tokenizer codes; see VISION_MODES)
    vision_mode: str = "continuous"
    # The published config.json this config was read from (keye.models.adapter.config_from_published), kept
    # so that writing it back returns the fields the toolkit does not read, and the file's own spelling of
    # those it does, instead of dropping them.
    published_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Check the fields that tie the parts together (and fill the default ``mrope_section``); also
        called after fields are set on a built config (``build_config`` overrides)."""
        if self.vision_mode not in VISION_MODES:
            raise ConfigError(f"vision_mode must be one of {list(VISION_MODES)}, got {self.vision_mode!r}")
        text = self.text_config
        if text.model_type not in ("qwen3", "qwen3_moe"):
            raise ConfigError(f"text_config.model_type must be 'qwen3' or 'qwen3_moe', got {text.model_type!r}")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if self.mrope_section is None:
            # Qwen2.5-VL's split scaled to this head size: t gets 1/4 of the pairs, h and w 3/8 each.
            t = head_dim // 8
            self.mrope_section = [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != head_dim // 2:
            raise ConfigError(
                f"mrope_section {self.mrope_section} must have 3 entries summing to head_dim/2 = {head_dim // 2}"
            )

    @property
    def is_moe(self) -> bool:
        return self.text_config.model_type == "qwen3_moe"
