"""Hermetic tiny random Wan components (WAN.md section 6), built in code from a fixed seed: the `tiny-random`
teacher of tests and dry runs. Nothing here touches a model hub."""

from __future__ import annotations

import string

import torch

from tmdcli.models.defaults import TINY_TRANSFORMER_CONFIG  # noqa: F401 (stdlib home, for torch-free plans)

TINY_VAE_CONFIG = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                       temperal_downsample=[False, True, True])
TINY_TEXT_ENCODER_CONFIG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)
TINY_WORDS = ("a the cat dog surfing runs red blue green car city night video slow motion wave ocean on in of "
              "and with bright static blurred worst quality low").split()


def build_tiny_tokenizer():
    """A Unigram T5 tokenizer from an in-memory vocabulary: <pad>, </s>, <unk> keep ids 0, 1, 2 (WAN.md 6.2)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_components(seed: int = 0) -> dict:
    """Transformer (4 blocks), VAE, umT5 encoder and tokenizer, random but reproducible, in eval mode."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tmdcli.models.wan import float32_rope

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG).eval()
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER_CONFIG)).eval()
    float32_rope(transformer)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def save_wan_layout(components: dict, folder, *, scheduler_flow_shift: float = 3.0) -> None:
    """Write components in the layout of the published Wan checkpoints (model_index.json + one folder each)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=scheduler_flow_shift)
    pipe = WanPipeline(tokenizer=components["tokenizer"], text_encoder=components["text_encoder"],
                       vae=components["vae"], scheduler=scheduler, transformer=components["transformer"])
    pipe.save_pretrained(str(folder), safe_serialization=True)
