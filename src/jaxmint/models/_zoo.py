"""Built-in models: an MLP, a CNN with batch norm and a decoder-only transformer.

Each is a flax linen module wrapped by `from_linen`, so it is a pure `Model`.
Hidden activations are sown into ``intermediates`` so loss terms (auxiliary
losses) and diagnostics can read them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmint.models._constrain import constrain
from jaxmint.models._flax import from_linen
from jaxmint.models._model import Model
from jaxmint.models._remat import Policy, policy_of, remat

AttentionFn = Callable[..., jax.Array]
"""``attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, *, is_causal) -> out_BxLxHxD``."""


def portable_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, *, is_causal: bool) -> jax.Array:
    """`jax.nn.dot_product_attention` with the causal mask built by comparing positions.

    The same numbers as the default attention. It exists for export: every target
    converts a position comparison, while ``is_causal=True`` becomes a boolean
    ``Where`` that ONNX Runtime does not implement. Use it for models you deploy
    with ONNX Runtime: ``transformer(..., attention=portable_attention)``.
    """
    mask_LxS = None
    if is_causal:
        length, source = q_BxLxHxD.shape[1], k_BxLxHxD.shape[1]
        mask_LxS = jnp.arange(length)[:, None] >= jnp.arange(source)[None, :]
    return jax.nn.dot_product_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask=mask_LxS)


def chunked_attention(chunk: int = 256) -> AttentionFn:
    """An attention that scores ``chunk`` queries at a time, for long sequences.

    ``jax.nn.dot_product_attention`` without a fused kernel (on a CPU, or wherever
    XLA runs it as plain operations) holds every head's ``length x length`` scores,
    and their gradient in the backward pass. This one runs the query chunks in a
    `jax.lax.map` whose body is rematerialized, so one chunk's scores (``chunk x
    length`` per head) exist at a time, forward and backward; the outputs and
    gradients are the default attention's (to float rounding). On a GPU, cuDNN's
    fused attention (``implementation="cudnn"``) does not hold the scores either.
    It exports to every target, ``onnx`` included (its causal mask compares
    positions, as `portable_attention`'s). Example::

        model = jaxmint.models.transformer(
            32_000, max_len=4096, attention=jaxmint.models.chunked_attention(512)
        )
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_attention: chunk must be a positive integer, got {chunk!r}")

    def attention(q_BxLxHxD, k_BxSxHxD, v_BxSxHxD, *, is_causal: bool) -> jax.Array:
        batch, length, heads, dim = q_BxLxHxD.shape
        source = k_BxSxHxD.shape[1]
        size = min(chunk, length)
        count = -(-length // size)
        q_BxLxHxD = jnp.pad(q_BxLxHxD, ((0, 0), (0, count * size - length), (0, 0), (0, 0)))
        q_NxBxCxHxD = q_BxLxHxD.reshape(batch, count, size, heads, dim).swapaxes(0, 1)

        @jax.checkpoint  # keep the chunk's queries only: its scores are recomputed backward
        def one(xs):
            q_BxCxHxD, start = xs
            q_BxCxHxD = _heads(q_BxCxHxD)
            mask_CxS = None
            if is_causal:  # as is_causal=True: query i sees keys 0..i
                mask_CxS = (start + jnp.arange(size))[:, None] >= jnp.arange(source)[None, :]
            return jax.nn.dot_product_attention(q_BxCxHxD, k_BxSxHxD, v_BxSxHxD, mask=mask_CxS)

        out_NxBxCxHxD = jax.lax.map(one, (q_NxBxCxHxD, jnp.arange(count) * size))
        out_BxLxHxD = out_NxBxCxHxD.swapaxes(0, 1).reshape(batch, count * size, heads, dim)
        return out_BxLxHxD[:, :length]

    attention.__name__ = attention.__qualname__ = f"chunked_attention({chunk})"
    return attention


class MLP(nn.Module):
    features: Sequence[int]
    num_outputs: int
    dropout: float = 0.0
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x_BxF, train: bool = False):
        h = x_BxF.reshape(x_BxF.shape[0], -1)
        for i, width in enumerate(self.features):
            h = self.activation(nn.Dense(width, name=f"dense{i}")(h))
            self.sow("intermediates", f"act{i}", h)
            if self.dropout:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.num_outputs, name="head")(h)


class CNN(nn.Module):
    channels: Sequence[int]
    num_outputs: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x_BxHxWxC, train: bool = False):
        h = x_BxHxWxC
        for i, ch in enumerate(self.channels):
            h = nn.Conv(ch, (3, 3), use_bias=False, name=f"conv{i}")(h)
            h = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                axis_name=self.axis_name if train else None,
                name=f"bn{i}",
            )(h)
            h = nn.relu(h)
            self.sow("intermediates", f"act{i}", h)
            if i < len(self.channels) - 1:
                h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_outputs, name="head")(h)


def _named(init, *names):
    """``init`` with logical axis names for its parameter (sharding rules map them)."""
    return nn.with_logical_partitioning(init, names)


def _embeds(x_BxLxD):
    """The residual stream: split by batch and by position (``residual_length``: over
    ``sequence`` and ``tensor``, Megatron's sequence parallelism), whole along the
    model width."""
    return constrain(x_BxLxD, "batch", "residual_length", "embed")


def _heads(x_BxLxHxK):
    """Queries, keys, values and attention outputs: heads split (over ``tensor``)."""
    return constrain(x_BxLxHxK, "batch", "length", "heads", "kv")


_DENSE = nn.initializers.lecun_normal()
_ZEROS, _ONES = nn.initializers.zeros_init(), nn.initializers.ones_init()


class Block(nn.Module):
    """Pre-norm attention and MLP. Megatron-style logical axes: attention heads and
    the MLP's hidden axis are ``heads`` and ``mlp`` (split over ``tensor`` by the
    default rules), the model width ``embed``."""

    num_heads: int
    attention: AttentionFn
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x_BxLxD):
        _, _, d = x_BxLxD.shape
        head_dim = d // self.num_heads
        h = nn.RMSNorm(name="norm1", scale_init=_named(_ONES, "norm"))(x_BxLxD)
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim),
            use_bias=False,
            kernel_init=_named(_DENSE, "embed", None, "heads", "kv"),
            name="qkv",
        )(h)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (_heads(qkv[:, :, i]) for i in range(3))
        att_BxLxHxK = _heads(self.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True))
        proj_BxLxD = nn.DenseGeneral(
            d,
            axis=(-2, -1),
            use_bias=False,
            kernel_init=_named(_DENSE, "heads", "kv", "embed"),
            name="proj",
        )(att_BxLxHxK)
        x_BxLxD = _embeds(x_BxLxD + proj_BxLxD)
        h = nn.RMSNorm(name="norm2", scale_init=_named(_ONES, "norm"))(x_BxLxD)
        h = nn.Dense(
            self.mlp_ratio * d,
            kernel_init=_named(_DENSE, "embed", "mlp"),
            bias_init=_named(_ZEROS, "mlp"),
            name="up",
        )(h)
        h_BxLxF = nn.gelu(constrain(h, "batch", "length", "mlp"))
        return _embeds(
            x_BxLxD
            + nn.Dense(
                d,
                kernel_init=_named(_DENSE, "mlp", "embed"),
                bias_init=_named(_ZEROS, "norm"),
                name="down",
            )(h_BxLxF)
        )


class _Layer(nn.Module):
    """One `Block` as the body of a scan over layers: ``(x, None) -> (x, None)``."""

    num_heads: int
    attention: AttentionFn
    remat: Policy

    @nn.compact
    def __call__(self, x_BxLxD, _):
        x_BxLxD = remat(Block, self.remat)(self.num_heads, self.attention, name="block")(x_BxLxD)
        self.sow("intermediates", "block_out", x_BxLxD)
        return x_BxLxD, None


class Transformer(nn.Module):
    vocab_size: int
    max_len: int
    d_model: int
    num_layers: int
    num_heads: int
    attention: AttentionFn
    remat: Policy = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens_BxL, train: bool = False):
        _, length = tokens_BxL.shape
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} exceeds the transformer's max_len {self.max_len}"
            )
        embed = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=_named(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                "vocab",
                "embed",
            ),
            name="embed",
        )
        pos_init = _named(nn.initializers.normal(0.02), "length", "embed")
        pos_LxD = self.param("pos", pos_init, (self.max_len, self.d_model))[:length]
        x_BxLxD = _embeds(embed(tokens_BxL) + pos_LxD)
        # Remat matters only where gradients are taken: inference runs the plain block.
        policy = self.remat if train else "none"
        if self.scan_layers:  # one block's program, its weights stacked on a `layers` axis
            layers = nn.scan(
                _Layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, _ = layers(self.num_heads, self.attention, policy, name="blocks")(
                x_BxLxD, None
            )
        else:
            for i in range(self.num_layers):
                block = remat(Block, policy)(self.num_heads, self.attention, name=f"block{i}")
                x_BxLxD = block(x_BxLxD)
                self.sow("intermediates", f"block{i}_out", x_BxLxD)
        x_BxLxD = nn.RMSNorm(name="norm", scale_init=_named(_ONES, "norm"))(x_BxLxD)
        self.sow("intermediates", "hidden", x_BxLxD)  # for losses.chunked_cross_entropy
        # tied embeddings: logits_BxLxV
        return constrain(embed.attend(x_BxLxD), "batch", "length", "vocab")


def mlp(features: Sequence[int] = (256, 256), num_outputs: int = 10, *, dropout=0.0) -> Model:
    """A ReLU multi-layer perceptron over flattened inputs.

    Example::

        model = jaxmint.models.mlp((128,), num_outputs=10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    """
    return from_linen(MLP(tuple(features), num_outputs, dropout))


def cnn(
    channels: Sequence[int] = (32, 64), num_outputs: int = 10, *, axis_name: str | None = None
) -> Model:
    """A small convolutional net with batch norm (state in ``batch_stats``) over NHWC images.

    ``axis_name="data"`` makes batch norm cross-replica under the ``pmap`` strategy
    (statistics averaged over devices, as on one device with the whole batch).
    """
    return from_linen(CNN(tuple(channels), num_outputs, axis_name))


def transformer(
    vocab_size: int,
    *,
    max_len: int = 256,
    d_model: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    attention: AttentionFn = jax.nn.dot_product_attention,
    remat: Policy = "none",
    scan_layers: bool = False,
) -> Model:
    """A decoder-only (causal) transformer language model with tied embeddings.

    ``remat`` recomputes each block's activations in the backward pass instead of
    keeping them (see `jaxmint.models.remat`): ``"none"``, ``"full"``, ``"dots"``,
    ``"dots_no_batch"`` or a `jax.checkpoint_policies` function. It applies to
    training steps; inference and export run the plain blocks.

    ``scan_layers=True`` runs the blocks as one `flax.linen.scan` (MaxText's and
    Levanter's layout): their weights are stacked on a leading ``layers`` axis
    (``params["blocks"]["block"][...]``, logical name ``layers``, never split by the
    default rules) and one block's program is compiled, whatever the depth. ``remat``
    then recomputes inside the loop's backward pass, where even XLA's CPU compiler
    keeps it late and the planned peak falls (`benchmarks/memory.py --scan-layers`;
    docs/parallel.md has the table). Its sown activations are
    ``intermediates["blocks"]["block_out"]``, stacked by layer, instead of
    ``block{i}_out``.

    ``attention`` is any function with the signature of
    ``jax.nn.dot_product_attention(q, k, v, *, is_causal)`` on ``BxLxHxD`` arrays,
    so a custom attention is a few lines::

        def my_attention(q, k, v, *, is_causal):
            return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)

        model = jaxmint.models.transformer(256, attention=my_attention)
    """
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    policy_of(remat)  # an unknown name fails here, not at the first step
    module = Transformer(
        vocab_size, max_len, d_model, num_layers, num_heads, attention, remat, scan_layers
    )
    return from_linen(module)._replace(input_range=(0, vocab_size))
