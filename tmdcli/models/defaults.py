"""Teacher sampling defaults (stdlib only, so plans and --dry-run never import torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The English Wan negative prompt (TMD Table 8; METHOD.md section 8).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


@dataclass(frozen=True, kw_only=True)
class SamplingDefaults:
    """A teacher's default video size and its own sampler's settings."""

    num_frames: int = 81
    height: int = 480
    width: int = 832
    num_steps: int = 50
    guidance_scale: float = 5.0
    flow_shift: float = 5.0  # Wan2.1's T2V sampler; the diffusers checkpoints' scheduler config says 3.0
    sampler: str = "unipc"
    fps: int = 16
    max_sequence_length: int = 512
    negative_prompt: str = WAN_NEGATIVE_PROMPT

    def to_dict(self) -> dict:
        return asdict(self)


# Published transformer configs (WAN.md 1.2): full-size shapes for benchmarks and memory plans, no weights needed.
WAN21_TRANSFORMER_CONFIGS = {
    "wan2.1-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "wan2.1-14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}


# The `tiny-random` teacher's transformer (built in tmdcli/models/tiny.py); here so plans can read it without torch.
TINY_TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                               out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=4,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
