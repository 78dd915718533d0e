"""What `--dry-run` says about a training run before anything is loaded: parameter counts, peak memory per GPU and
FLOPs per iteration, from the transformer's config alone (no torch import).

Parameter counts are exact for diffusers' WanTransformer3DModel (text-to-video, no image embedder) and our student
extras (tests compare them with built models, including the full 1.3B config on the meta device). FLOPs count
matrix multiplications (2 per multiply-add) in the DiT blocks and attention; embeddings, norms and the VAE are
ignored, as in TMD Eq. 16. Activation memory is a model, not a measurement: each block keeps about
ACT_D_PER_TOKEN x D + ACT_F_PER_TOKEN x F bf16 values per token for the backward pass (flash attention keeps no
N x N matrix); `benchmarks/train_step.py` measures the real peak on a GPU.

Calibration (docs/bench/train_memory_h200.json, H200, 1.3B shapes, micro-batch 1, checkpointing on; tests/
test_estimates.py keeps every estimate within 10% of it): with checkpointing the peak holds the weights, AdamW
moments, gradients, bf16 autocast copies and every checkpointed block's bf16 input, but not the one block being
recomputed (the backward frees saved inputs as it goes and gradients build up gradually); Stage 2's student and
critic steps peak separately (the critic step holds the fake score's gradients and two discriminator passes, the
student step the student's), and the discriminator's saved activations are large (full-resolution conv, GroupNorm
and LeakyReLU maps per scale and head), so they are modelled explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

ACT_D_PER_TOKEN = 16  # norm outputs, q/k/v/o, residuals, cross-attention q/o, modulation products (bf16)
ACT_F_PER_TOKEN = 2  # FFN hidden before and after GELU
GIB = 1024**3


@dataclass(frozen=True)
class WanShape:
    dim: int  # D
    ffn_dim: int  # F
    num_blocks: int  # L
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)

    @classmethod
    def from_config(cls, config: dict) -> "WanShape":
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        return cls(dim=dim, ffn_dim=config["ffn_dim"], num_blocks=config["num_layers"],
                   in_channels=config.get("in_channels", 16), out_channels=config.get("out_channels") or 16,
                   text_dim=config.get("text_dim", 4096), freq_dim=config.get("freq_dim", 256),
                   patch=tuple(config.get("patch_size", (1, 2, 2))))

    @property
    def patch_volume(self) -> int:
        return self.patch[0] * self.patch[1] * self.patch[2]

    def tokens(self, latent_shape) -> int:
        _, t, h, w = latent_shape
        return (t // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def block_params(s: WanShape) -> int:
    """One WanTransformerBlock: self- and cross-attention (q, k, v, out + RMS qk-norms), affine cross-attention
    norm, FFN, and the block's own 6 x D modulation table."""
    attention = 4 * linear(s.dim, s.dim) + 2 * s.dim
    return 2 * attention + 2 * s.dim + linear(s.dim, s.ffn_dim) + linear(s.ffn_dim, s.dim) + 6 * s.dim


def transformer_params(s: WanShape) -> dict[str, int]:
    patch = s.in_channels * s.patch_volume * s.dim + s.dim
    condition = (linear(s.freq_dim, s.dim) + linear(s.dim, s.dim)  # time_embedder
                 + linear(s.dim, 6 * s.dim)  # time_proj
                 + linear(s.text_dim, s.dim) + linear(s.dim, s.dim))  # text_embedder
    output = linear(s.dim, s.out_channels * s.patch_volume) + 2 * s.dim
    blocks = s.num_blocks * block_params(s)
    return {"blocks": blocks, "embeddings_and_output": patch + condition + output,
            "total": blocks + patch + condition + output}


def extras_params(s: WanShape, fusion: str = "gated", mlp_dim: int | None = None) -> int:
    """The student's new modules: fusion layer and the zero-output (s - r) embedder (METHOD.md 2.2-2.3)."""
    r_embedder = linear(s.freq_dim, s.dim) + linear(s.dim, s.dim) + linear(s.dim, 6 * s.dim)
    if fusion == "concat":
        return r_embedder + linear(2 * s.dim, s.dim)
    f = mlp_dim or s.ffn_dim
    return r_embedder + 2 * s.dim + linear(s.dim, f) + linear(f, s.dim) + linear(s.dim, s.dim) + 1


def block_forward_flops(s: WanShape, tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one block on one sample: projections, attention (N^2), cross-attention, FFN."""
    n, d, f, t = tokens, s.dim, s.ffn_dim, text_tokens
    self_attention = 8 * n * d * d + 4 * n * n * d
    cross_attention = 4 * n * d * d + 4 * t * d * d + 4 * n * t * d
    return self_attention + cross_attention + 4 * n * d * f


def sampling_flops(s: WanShape, latent_shape, *, block_passes: float, text_tokens: int = 512) -> float:
    """Matmul FLOPs of one clip's sampling: `block_passes` DiT block evaluations (teacher: steps x CFG passes x L;
    TMD student: effective NFE x L, METHOD.md Eq. 16) at this latent size. The MFU of benchmarks/sample_speed.py."""
    return block_passes * block_forward_flops(s, s.tokens(latent_shape), text_tokens)


def activation_bytes_per_block(s: WanShape, tokens: int, bytes_per_value: int = 2) -> float:
    return tokens * (ACT_D_PER_TOKEN * s.dim + ACT_F_PER_TOKEN * s.ffn_dim) * bytes_per_value


@dataclass(frozen=True)
class TrainEstimate:
    trainable_params: int
    frozen_params: int
    flops_per_iteration: float  # whole global batch
    weights_gib: float  # fp32 master weights of the trained networks, per GPU
    grads_gib: float
    optimizer_gib: float  # AdamW exp_avg + exp_avg_sq
    frozen_gib: float  # frozen networks (bf16 on GPU)
    activations_gib: float  # per GPU, micro-batch, with the chosen checkpointing
    activations_other_gib: float  # the other checkpointing setting, for comparison
    peak_gib: float
    step_peaks_gib: dict | None = None  # Stage 2: {"student": ..., "critic": ...}; peak_gib is their max

    def rows(self, checkpointing: bool) -> list[tuple[str, str]]:
        other = "off" if checkpointing else "on"
        g = human_gib
        steps = "" if not self.step_peaks_gib else " (" + ", ".join(
            f"{k} step {g(v)}" for k, v in self.step_peaks_gib.items()) + "; the larger step's terms below)"
        return [
            ("parameters", f"{human_count(self.trainable_params)} trained, {human_count(self.frozen_params)} frozen"),
            ("memory/GPU (estimate)",
             f"~{g(self.peak_gib)} peak{steps} = weights {g(self.weights_gib)} + grads {g(self.grads_gib)} + AdamW "
             f"{g(self.optimizer_gib)} + frozen {g(self.frozen_gib)} + activations {g(self.activations_gib)} "
             f"(checkpointing {'on' if checkpointing else 'off'}; {g(self.activations_other_gib)} with it {other})"),
            ("compute", f"{human_flops(self.flops_per_iteration)} per iteration (global batch)"),
        ]


def human_gib(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB" if gib * 1024 >= 0.1 else \
        f"{gib * 1024 ** 2:.0f} KiB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:,.2f}{unit}"
    return f"{n:.0f}"


def human_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} FLOP"


def estimate_training(*, trainable_params: int, frozen_params: int, forward_flops_per_sample: float,
                      activation_bytes: float, activation_bytes_checkpointed: float, batch: int, world_size: int,
                      checkpointing: bool, sharded: bool, frozen_bytes_per_param: int = 2) -> TrainEstimate:
    """Combine per-sample numbers into per-GPU memory and per-iteration FLOPs.

    `forward_flops_per_sample` must already include every pass of the objective (e.g. 3x for forward + backward,
    no-grad CFG passes); activation bytes are for one micro-batch.
    """
    share = world_size if sharded else 1
    weights = 4 * trainable_params / share
    act, other = ((activation_bytes_checkpointed, activation_bytes) if checkpointing
                  else (activation_bytes, activation_bytes_checkpointed))
    frozen = frozen_bytes_per_param * frozen_params / share
    # bf16 autocast keeps a bf16 copy of every weight it used until the forward ends: 2 bytes per parameter.
    autocast_copies = 2 * trainable_params / share
    peak = 4 * weights + frozen + act + autocast_copies  # weights + grads + 2 Adam moments
    return TrainEstimate(trainable_params=trainable_params, frozen_params=frozen_params,
                         flops_per_iteration=forward_flops_per_sample * batch, weights_gib=weights / GIB,
                         grads_gib=weights / GIB, optimizer_gib=2 * weights / GIB, frozen_gib=frozen / GIB,
                         activations_gib=act / GIB, activations_other_gib=other / GIB, peak_gib=peak / GIB)


def tm_meanflow_estimate(s: WanShape, latent_shape, *, num_head_blocks: int, batch: int, micro_batch: int,
                         world_size: int, checkpointing: bool, cfg_scale: float, r_equals_s_prob: float,
                         text_tokens: int = 512, fusion: str = "gated", sharded: bool = False) -> TrainEstimate:
    """Stage 1 (TM-MF) per iteration: one no-grad CFG pass (student, negative prompt), one forward + backward of
    the whole student (backward = 2x forward; +1x with checkpointing), and two no-grad head passes for the
    (1 - r_equals_s_prob) share of samples that need the finite-difference derivative."""
    n = s.tokens(latent_shape)
    block = block_forward_flops(s, n, text_tokens)
    full, head = s.num_blocks * block, num_head_blocks * block
    passes = (1.0 if cfg_scale != 1.0 else 0.0) * full + (3.0 + (1.0 if checkpointing else 0.0)) * full \
        + (1.0 - r_equals_s_prob) * 2 * head
    act_block = activation_bytes_per_block(s, n)
    no_ckpt = micro_batch * s.num_blocks * act_block
    with_ckpt = micro_batch * s.num_blocks * n * s.dim * 2  # bf16 block inputs (the recompute is not at the peak)
    trainable = transformer_params(s)["total"] + extras_params(s, fusion)
    return estimate_training(trainable_params=trainable, frozen_params=0, forward_flops_per_sample=passes,
                             activation_bytes=no_ckpt, activation_bytes_checkpointed=with_ckpt, batch=batch,
                             world_size=world_size, checkpointing=checkpointing, sharded=sharded)


def discriminator_activation_bytes(s: WanShape, latent_shape, *, num_heads: int, reduction: int = 1,
                                   scales=(1, 2, 4, 8, 16)) -> float:
    """Saved activations of one discriminator pass with grad over its K heads (models/discriminator.py,
    METHOD.md 5.2), per sample: each head casts its bf16 feature map (C_in = D / patch volume channels at latent
    resolution) to fp32, and per scale k runs conv -> GroupNorm -> LeakyReLU at full resolution and again after a
    k x k x k average pool; each such map keeps ~10 bytes per value (bf16 conv output, fp32 GN input and output)."""
    _, t, h, w = latent_shape
    voxels = t * h * w
    c_in = s.dim // s.patch_volume
    c = c_in // reduction
    per_head = 4 * c_in * voxels
    for k in scales:
        pooled = voxels / (min(k, t) * min(k, h) * min(k, w))
        per_head += 10 * c * (voxels + pooled)
    return num_heads * per_head


def lora_params(s: WanShape, rank: int, adapted_linears: int | None = None) -> int:
    """LoRA adapter parameters of one Wan transformer: r (in + out) per adapted block linear; by default all ten
    (q, k, v, o of self- and cross-attention: 8 x 2D; FFN: 2 x (D + F)), as `tmd distill --lora-rank` does."""
    per_block = 8 * rank * 2 * s.dim + 2 * rank * (s.dim + s.ffn_dim)
    if adapted_linears is not None:  # a subset: scale by the count (attention-sized approximation)
        per_block = per_block * adapted_linears // 10
    return s.num_blocks * per_block


def dmd_estimate(s: WanShape, latent_shape, *, num_head_blocks: int, num_inner_steps: int, method: str,
                 discriminator_params: int, last_disc_layer: int, batch: int, micro_batch: int, world_size: int,
                 checkpointing: bool, student_every: int = 5, text_tokens: int = 512,
                 frozen_bytes_per_param: int = 2, sharded: bool = False, num_disc_heads: int = 3,
                 disc_reduction: int | None = None, lora_rank: int = 0, lora_targets=None,
                 critic_state: bool = True) -> TrainEstimate:
    """Stage 2 (DMD2-v + rollout) per iteration, averaged over the alternation (1 student step in `student_every`).

    FLOPs. Student step: the rollout (backbone + N head passes, or one full pass for DMD2-v) forward + backward, the
    fake score (no grad), the teacher's negative pass (no grad) and its conditional pass with the graph to its input
    (forward + backward). Critic step: the rollout without grad, the fake score forward + backward, and two teacher
    feature passes up to the last discriminator layer (no grad).

    Memory, per step (the peak is the larger). Both: fp32 weights and AdamW moments of student, fake score and
    discriminator (`critic_state=False`: the critic's moments not yet allocated, as when benchmarks/train_step.py
    measures a student step before any critic step), the frozen teacher (bf16). Student step: the student's
    gradients and autocast copies, the rollout's and the teacher's checkpointed block inputs, one discriminator pass
    (generator loss). Critic step: the fake score's and discriminator's gradients and autocast copies, the fake
    score's block inputs, two discriminator passes (fake and real).
    LoRA (`lora_rank` > 0): student and fake score keep frozen fp32 base weights; only their adapters (plus the
    student's fusion and r-embedder, and the discriminator) are trained. FSDP2 (`sharded`): every weight, gradient
    and moment, trained or frozen, is split over the ranks; two gathered blocks (fp32, one prefetched) are added.
    """
    n = s.tokens(latent_shape)
    block = block_forward_flops(s, n, text_tokens)
    full = s.num_blocks * block
    rollout_blocks = s.num_blocks if method == "dmd2v" else s.num_blocks - num_head_blocks + num_inner_steps * \
        num_head_blocks
    rollout = rollout_blocks * block
    recompute = 1.0 if checkpointing else 0.0
    student_flops = (3 + recompute) * rollout + full + full + (3 + recompute) * full
    critic_flops = rollout + (3 + recompute) * full + 2 * (last_disc_layer + 1) * block
    per_sample = (student_flops + (student_every - 1) * critic_flops) / student_every

    base = transformer_params(s)["total"]
    extras = extras_params(s) if method != "dmd2v" else 0
    adapters = lora_params(s, lora_rank, None if lora_targets is None else _count_linears(lora_targets)) \
        if lora_rank else 0
    student_trained = (adapters + extras) if lora_rank else base + extras
    fake_trained = adapters if lora_rank else base
    frozen_fp32 = 2 * base if lora_rank else 0  # LoRA: the frozen bases of student and fake score
    share = world_size if sharded else 1
    reduction = disc_reduction or (2 if s.dim >= 5120 else 1)

    act_block = activation_bytes_per_block(s, n)
    block_input = n * s.dim * 2
    graph_blocks = rollout_blocks + s.num_blocks  # student rollout + teacher conditional pass
    disc_pass = discriminator_activation_bytes(s, latent_shape, num_heads=num_disc_heads, reduction=reduction)
    if checkpointing:
        act_student = micro_batch * (graph_blocks * block_input + disc_pass)
        act_critic = micro_batch * (s.num_blocks * block_input + 2 * disc_pass)
        other_student = micro_batch * (graph_blocks * act_block + disc_pass)
    else:
        act_student = micro_batch * (graph_blocks * act_block + disc_pass)
        act_critic = micro_batch * (s.num_blocks * act_block + 2 * disc_pass)
        other_student = micro_batch * (graph_blocks * block_input + disc_pass)

    trained = student_trained + fake_trained + discriminator_params
    weights = 4 * trained / share
    moments = 8 * (student_trained + (fake_trained + discriminator_params if critic_state else 0)) / share
    frozen = (frozen_bytes_per_param * base + 4 * frozen_fp32) / share
    gathered = 2 * 4 * block_params(s) if sharded else 0
    static = weights + moments + frozen + gathered
    student_step = static + 6 * (student_trained + discriminator_params) / share + act_student  # grads + copies
    critic_step = static + 6 * (fake_trained + discriminator_params) / share + act_critic
    peak = max(student_step, critic_step)
    critic_peaks = critic_step >= student_step
    grads = 4 * ((fake_trained if critic_peaks else student_trained) + discriminator_params) / share
    return TrainEstimate(trainable_params=trained, frozen_params=base + frozen_fp32,
                         flops_per_iteration=per_sample * batch, weights_gib=weights / GIB, grads_gib=grads / GIB,
                         optimizer_gib=moments / GIB, frozen_gib=frozen / GIB,
                         activations_gib=(act_critic if critic_peaks else act_student) / GIB,
                         activations_other_gib=other_student / GIB, peak_gib=peak / GIB,
                         step_peaks_gib={"student": student_step / GIB, "critic": critic_step / GIB})


def _count_linears(targets) -> int:
    from tmdcli.models.lora import matched_linears  # torch-free: a name match

    return len(matched_linears(targets))
