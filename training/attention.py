"""CogVideoX's attention as training runs it: the kernel chosen by --attention_backend, and sequence parallelism.

CogVideoX attends jointly over [text tokens ; video tokens]. `CogVideoXAttention` is diffusers' CogVideoX processor
with two changes: the kernel goes through diffusers' attention dispatcher (so `set_attention_backend` picks native
SDPA, flash, flash 3, ...), and with sequence parallelism the video tokens are exchanged around the kernel.

Sequence parallelism (Ulysses style, `--enable_sequence_parallelism --sequence_parallel_shards N`): the N processes
of a shard group train the same sample. Each keeps every text token and 1/N of the video tokens through the blocks;
everything in a block but attention works token by token (norms, feed-forward, gates from the timestep), so only
attention exchanges:

- before the kernel, an all-to-all turns (all heads, my video tokens) into (my heads, all video tokens); the text
  tokens, which every process has, just take its heads; rotary positions are applied after it, to the whole sequence;
- after the kernel, the reverse all-to-all, and the text tokens' heads are gathered from the group.

The video tokens are split right after the patch embedding (a hook on `embedding_dropout`) and gathered again after
`proj_out`, so unpatchify and the loss see the whole sample on every process of the group. Each exchange's backward
is its adjoint (the reverse all-to-all; a reduce-scatter for a gather), so the group's processes together hold the
sample's gradient N times over; data parallelism averages over all processes (N per sample), which leaves the
sample's gradient once. No process holds the attention of all heads over all tokens, or the activations of more
than 1/N of the video tokens.

Validation videos run whole sequences (`SequenceShards.paused`): only the main process generates under DDP.
"""

import contextlib

import torch


# Kernels with a backward pass (diffusers' sage backends are inference-only).
TRAINING_BACKENDS = ("native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn", "flash",
                     "_flash_3", "flash_hub", "_flash_3_hub")


class CogVideoXAttention:
    """Attention processor for CogVideoX's joint text+video attention (see the module docstring)."""

    _attention_backend = None  # set by diffusers' ModelMixin.set_attention_backend; None: the active default
    _parallel_config = None  # diffusers' own context parallelism: not used for CogVideoX

    def __init__(self, shards=None):
        self.shards = shards

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if attention_mask is not None:
            raise ValueError("CogVideoX attention takes no attention mask")
        text_length = encoder_hidden_states.size(1)
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        # [batch, tokens, heads, head_dim]: the dispatcher's layout
        query, key, value = (project(tokens).unflatten(-1, (attn.heads, -1)) for project in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Under CUDA autocast the norms return fp32 beside the projections' 16-bit value: kernels such as flash take
        # one 16-bit dtype, and the sequence-parallel exchange would move fp32 (SDPA casts to the autocast dtype anyway).
        query, key = query.to(value.dtype), key.to(value.dtype)
        shards = self.shards if self.shards is not None and self.shards.active else None
        if shards is not None:
            query, key, value = (shards.tokens_to_heads(t, text_length) for t in (query, key, value))
        if image_rotary_emb is not None:
            query = _rotate_video_tokens(query, text_length, image_rotary_emb)
            if not attn.is_cross_attention:
                key = _rotate_video_tokens(key, text_length, image_rotary_emb)
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        if shards is not None:
            out = shards.heads_to_tokens(out, text_length)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))
        return out[:, text_length:], out[:, :text_length]


def _rotate_video_tokens(x, text_length, rotary):
    from diffusers.models.embeddings import apply_rotary_emb

    video = apply_rotary_emb(x[:, text_length:], rotary, sequence_dim=1)
    return torch.cat([x[:, :text_length], video], dim=1)


class SequenceShards:
    """A shard group: `size` processes that train one sample together; this process is `rank` in it.

    `active` is on from the start: training's forward and its recomputation in the backward pass (gradient
    checkpointing) must both run sharded. `paused()` turns it off around whole-sequence work (validation videos)."""

    def __init__(self, size, rank, group):
        self.size, self.rank, self.group = size, rank, group
        self.active = True
        self.text_length = None  # of the forward in progress (recorded by the patch embedding's hook)
        self.sharded_calls = 0  # transformer forwards run sharded (their output tokens gathered)

    @contextlib.contextmanager
    def paused(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

    # ---------------------------------------------------------------- around the blocks
    def split(self, tokens):
        """[B, N, C] -> this process's [B, N/size, C] (contiguous runs of video tokens, in rank order)."""
        return tokens.chunk(self.size, dim=1)[self.rank]

    def gather(self, tokens):
        """[B, N/size, C] from every process of the group -> [B, N, C] (backward: the sum of every process's
        gradient for this process's part)."""
        return self._all_gather(tokens.contiguous(), 1)

    # ---------------------------------------------------------------- around the kernel
    def tokens_to_heads(self, x, text_length):
        """[B, T + N/size, H, D] -> [B, T + N, H/size, D]: the text tokens' own heads, every video token's."""
        batch, local, heads, dim = x.shape[0], x.shape[1] - text_length, x.shape[2], x.shape[3]
        mine = slice(self.rank * heads // self.size, (self.rank + 1) * heads // self.size)
        video = x[:, text_length:].reshape(batch, local, self.size, heads // self.size, dim)
        video = self._all_to_all(video.permute(2, 0, 1, 3, 4).contiguous())  # [from rank, B, local, H/size, D]
        video = video.permute(1, 0, 2, 3, 4).reshape(batch, self.size * local, heads // self.size, dim)
        return torch.cat([x[:, :text_length, mine], video], dim=1)

    def heads_to_tokens(self, x, text_length):
        """[B, T + N, H/size, D] -> [B, T + N/size, H, D]: the reverse, the text tokens' heads gathered."""
        batch, heads, dim = x.shape[0], x.shape[2] * self.size, x.shape[3]
        local = (x.shape[1] - text_length) // self.size
        text = self._all_gather(x[:, :text_length].contiguous(), 0)  # [size * B, T, H/size, D]
        text = text.reshape(self.size, batch, text_length, heads // self.size, dim).permute(1, 2, 0, 3, 4)
        video = x[:, text_length:].reshape(batch, self.size, local, heads // self.size, dim)
        video = self._all_to_all(video.permute(1, 0, 2, 3, 4).contiguous())  # [from rank (its heads), B, local, ...]
        video = video.permute(1, 2, 0, 3, 4)
        return torch.cat([text.reshape(batch, text_length, heads, dim), video.reshape(batch, local, heads, dim)], 1)

    # ---------------------------------------------------------------- the collectives (differentiable)
    def _all_to_all(self, x):
        """Chunk i of dim 0 goes to process i; chunk i of the result came from process i."""
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, self.group))

    def _all_gather(self, x, dim):
        import torch.distributed._functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd  # torch < 2.10
        return funcol.wait_tensor(gather(x, dim, self.group))


class SimulatedShards(SequenceShards):
    """One process of a shard group, for the --dry_run memory estimate: every exchange makes a tensor of the shape
    (and so the memory) the real one would, from this process's data alone."""

    def __init__(self, size):
        super().__init__(size, 0, None)

    def _all_to_all(self, x):
        return x.clone()

    def _all_gather(self, x, dim):
        return torch.cat([x] * self.size, dim=dim)


def build_shard_groups(size):
    """This process's SequenceShards: groups of `size` consecutive ranks (one machine's GPUs where they fit). Making
    a group is a collective: every process makes every group, in the same order."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = SequenceShards(size, rank - first, group)
    return mine


def install(transformer, shards=None, attention_backend=None):
    """Our attention processor on every block of `transformer` (before LoRA layers: they wrap the projections it
    calls), the kernel `attention_backend` (diffusers' set_attention_backend checks its name and package), and, with
    `shards`, the hooks that split the video tokens after the patch embedding and gather them after proj_out."""
    transformer.set_attn_processor(CogVideoXAttention(shards))
    if attention_backend:
        transformer.set_attention_backend(attention_backend)
    if shards is None:
        return transformer

    def record_text_length(module, inputs):
        shards.text_length = inputs[0].shape[1]  # patch_embed(text_embeds, image_embeds)

    def split_video_tokens(module, inputs, output):
        if not shards.active:
            return output
        text = shards.text_length
        return torch.cat([output[:, :text], shards.split(output[:, text:])], dim=1)

    def gather_video_tokens(module, inputs, output):
        if not shards.active:
            return output
        shards.sharded_calls += 1
        return shards.gather(output)

    transformer.patch_embed.register_forward_pre_hook(record_text_length)
    transformer.embedding_dropout.register_forward_hook(split_video_tokens)
    transformer.proj_out.register_forward_hook(gather_video_tokens)
    return transformer


def video_tokens(num_frames, height, width, transformer_config, spatial_scale=8):
    """Video tokens of one clip for this transformer (its patch sizes over the latent grid)."""
    from .models import latent_grid

    frames, latent_height, latent_width = latent_grid(num_frames, height, width, transformer_config, spatial_scale)
    patch, patch_t = transformer_config["patch_size"], transformer_config.get("patch_size_t") or 1
    return (frames // patch_t) * (latent_height // patch) * (latent_width // patch)


def shard_problems(shapes, transformer_config, shards, what="bucket"):
    """Sequence parallelism's rules, one line each: the attention heads, and the video tokens of every (frames,
    height, width) in `shapes` (the buckets in use, or the videos to generate), divisible by the shards."""
    problems = []
    heads = transformer_config["num_attention_heads"]
    if heads % shards:
        problems.append(f"--sequence_parallel_shards {shards}: the model's {heads} attention heads do not split "
                        f"evenly (shard counts that fit: {', '.join(str(n) for n in range(2, 9) if heads % n == 0)})")
    for frames, height, width in sorted(shapes):
        tokens = video_tokens(frames, height, width, transformer_config)
        if tokens % shards:
            fitting = [n for n in range(2, 9) if tokens % n == 0]
            problems.append(f"{what} {frames}x{height}x{width}: its {tokens} video tokens do not split into "
                            f"--sequence_parallel_shards {shards} equal parts (shard counts that fit: "
                            f"{', '.join(map(str, fitting)) or 'none up to 8'}); change the shards or the {what}")
    return problems
