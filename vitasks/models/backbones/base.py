"""What the image and the video ViT share: :class:`ViTBackbone`.

The base holds the arguments every ViT checks the same way (width, heads, MLP activation,
pooling against the class token), the stochastic-depth rates, the final norms (``norm`` on all
tokens or ``fc_norm`` after pooling), the weight initialisation, the block call (gradient
checkpointing under ``with_cp``), pooling, ``frozen`` and the parameter groups the optimizer
reads (``get_layer_id`` for layer-wise lr decay, ``no_weight_decay``). Each subclass keeps its
own embedding, block layout and checkpoint loading.
"""

import inspect
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitasks.checks import building, component_class, config_key, divisible, options
from vitasks.errors import ConfigError
from vitasks.registry import MODELS

from ..layers import mlp_act_layer

#: ``F.interpolate`` modes a position-embedding resampling may use.
INTERPOLATE_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")


class ViTBackbone(nn.Module):
    """Base of :class:`~vitasks.models.backbones.VisionTransformer` and
    :class:`~vitasks.models.backbones.VideoVisionTransformer` (see the module docstring).

    Subclasses set ``embed_names`` (the first component of the parameter names of the embedding
    "layer": layer id 0) and ``no_decay_names`` (parameters without weight decay when present),
    build ``blocks``, ``norm`` and ``fc_norm`` (:meth:`final_norms`) and ``num_prefix_tokens``.

    Keyword arguments both ViTs take as they are (a subclass passes them on as ``**kwargs``):
        mlp_ratio: MLP hidden width / ``embed_dim``.
        qkv_bias: bias in the fused qkv projection.
        drop_rate: dropout after the position embeddings, the attention projection and the MLP.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth of the last block; it rises linearly from 0 over the
            blocks (:meth:`drop_path_rates`).
        layer_scale_init_value: LayerScale init (e.g. 1e-5); None: no LayerScale.
        norm_eps: LayerNorm epsilon of the blocks and the final norms (1e-6 as the original ViT).
        mlp_act: activation of every block's MLP: ``"gelu"`` (exact, erf; PyTorch/timm-trained
            weights) or ``"gelu_tanh"`` (the tanh approximation, JAX's default ``nn.gelu``:
            Google's ``.npz`` weights, ViViT's ``gelu_fast``).

    They become ``drop_rate``, ``drop_path_rate``, ``norm_eps`` and ``block_kwargs`` (what every
    block gets: ``drop_rate`` as ``proj_drop``, ``attn_drop_rate`` as ``attn_drop``).
    """

    config_key = "model.backbone"
    embed_names: Tuple[str, ...] = ()
    no_decay_names: Tuple[str, ...] = ()

    def __init__(self, embed_dim: int, depth: int, num_heads: int, pool: str, class_token: bool, with_cp: bool,
                 frozen: bool = False, *, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 layer_scale_init_value: Optional[float] = None, norm_eps: float = 1e-6, mlp_act: str = "gelu") -> None:
        super().__init__()
        divisible(self.key(), embed_dim=embed_dim, num_heads=num_heads)
        if pool in ("token", "token_mean") and not class_token:
            raise ConfigError(f'{self.key()}: pool="{pool}" needs class_token=True; use pool="mean" without a '
                              "class token")
        mlp_act_layer(mlp_act, key=self.key("mlp_act"))  # validated before anything is built
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.pool = pool
        self.mlp_act = mlp_act
        self.frozen = frozen
        self.grad_checkpointing = bool(with_cp)
        self.drop_rate, self.drop_path_rate, self.norm_eps = drop_rate, drop_path_rate, norm_eps
        self.block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                 layer_scale_init_value=layer_scale_init_value, norm_eps=norm_eps, mlp_act=mlp_act)

    def key(self, name: str = "") -> str:
        """The config key of this backbone's argument ``name`` (of the backbone itself for "")."""
        return config_key(name, default=self.config_key)

    # ---------------------------------------------------------------------------- construction

    def build_stem(self, stem: Optional[dict], in_channels: int, embed_dim: int, patch_size: int, default: str,
                   choices: Tuple[str, ...]) -> nn.Module:
        """The stem the config dict ``stem`` names by ``type`` (``default`` when None), built from
        MODELS with ``in_channels``, ``embed_dim`` (and ``patch_size`` if it takes one); errors
        name ``<backbone key>.stem`` (``choices``: the names suggested for a misspelt type). Its
        ``stride`` must equal ``patch_size``."""
        where = self.key("stem")
        stem = options(dict(type=default) if stem is None else stem, where, required=("type",),
                       what=f"a dict with a `type` (e.g. {', '.join(choices)})")
        stem_type = stem.pop("type")
        cls = component_class(stem_type, MODELS, where, "stem", choices=choices)
        name = getattr(cls, "__name__", str(stem_type))
        params = inspect.signature(cls).parameters
        given = dict(in_channels=in_channels, embed_dim=embed_dim)
        if "patch_size" in params:
            given["patch_size"] = patch_size
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        cfg = options(stem, where, None if open_ended else list(params), owner=name, given=given, parent=self.key())
        with building("stem", root=self.config_key):  # the stem's errors name <this backbone's key>.stem
            module = cls(**cfg)
        stride = getattr(module, "stride", None)
        if not isinstance(stride, int) or stride != patch_size:
            raise ConfigError(
                f"{self.key()}: the {name} stem has total stride {stride!r} but {self.key('patch_size')} is "
                f"{patch_size}; set patch_size: {stride} (or change the stem's strides; a stem exposes an integer "
                "`stride`)"
            )
        return module

    def grid_of(self, size: Tuple[int, ...], stride: int, name: str, by: str = "the stem stride") -> Tuple[int, ...]:
        """``size // stride`` per dimension, for the argument ``name``; a ConfigError unless each
        dimension is divisible by ``stride`` (``by``: what the stride is called)."""
        if any(s % stride for s in size):
            shown = list(size) if len(size) > 1 else size[0]
            raise ConfigError(f"{self.key(name)} {shown} must be divisible by {by} {stride}")
        return tuple(s // stride for s in size)

    def check_input(self, sizes: Tuple[int, ...], strides: Tuple[int, ...]) -> None:
        """An input of ``sizes`` ((H, W), or (T, H, W) for clips) must split into whole stem
        patches (``strides`` per dimension): a ConfigError that says what to change otherwise."""
        if any(s % k for s, k in zip(sizes, strides)):
            stride = strides[0] if len(set(strides)) == 1 else "x".join(map(str, strides))
            clips = len(sizes) == 3
            raise ConfigError(
                f"{type(self).__name__}: input size {'x'.join(map(str, sizes))} is not divisible by the stem stride "
                f"{stride} (it does not split into {'tubelets' if clips else 'patches'}); "
                f"{'sample the frames and ' if clips else ''}resize, crop or pad to a multiple of it in the data "
                "pipeline"
            )

    @staticmethod
    def drop_path_rates(rate: float, count: int) -> List[float]:
        """Stochastic depth rising linearly from 0 to ``rate`` over ``count`` blocks (plain Python,
        so the model can also be built on the meta device)."""
        return [rate * i / (count - 1) if count > 1 else 0.0 for i in range(count)]

    @staticmethod
    def final_norms(embed_dim: int, eps: float, pool: str, fc_norm: Optional[bool], final_norm: bool,
                    fc_eps: Optional[float] = None) -> Tuple[nn.Module, nn.Module]:
        """``(norm, fc_norm)``: a LayerNorm on all tokens, or one after pooling when ``fc_norm``
        (None: iff ``pool == "mean"``, the timm/MAE convention); Identity where there is none."""
        use_fc_norm = (pool == "mean") if fc_norm is None else bool(fc_norm)
        norm = nn.LayerNorm(embed_dim, eps=eps) if final_norm and not use_fc_norm else nn.Identity()
        fc = nn.LayerNorm(embed_dim, eps=eps if fc_eps is None else float(fc_eps)) if final_norm and use_fc_norm \
            else nn.Identity()
        return norm, fc

    @staticmethod
    def init_embeddings(tables: Iterable[Optional[torch.Tensor]] = (),
                        tokens: Iterable[Optional[torch.Tensor]] = ()) -> None:
        """Position tables: truncated normal (std 0.02); class / register tokens: normal (std
        1e-6), in that order (timm's initialisation)."""
        for table in tables:
            if table is not None:
                nn.init.trunc_normal_(table, std=0.02)
        for token in tokens:
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    @staticmethod
    def init_linears(modules: Iterable[nn.Module], skip: str = "") -> None:
        """Every ``nn.Linear`` in ``modules`` (but those whose name ends with ``skip``): weights
        truncated normal (std 0.02), biases zero."""
        for module in modules:
            for name, m in module.named_modules():
                if isinstance(m, nn.Linear) and not (skip and name.endswith(skip)):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------- running

    def train(self, mode: bool = True) -> "ViTBackbone":
        """As ``nn.Module.train``; a ``frozen`` backbone stays in eval mode."""
        return super().train(mode and not getattr(self, "frozen", False))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def run_block(self, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        """``block(x, *args)``, checkpointed when gradient checkpointing is on and gradients are
        wanted. Every block call goes through here (token reductions too)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def pool_tokens(self, x: torch.Tensor, mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens after the final ``norm`` -> pooled (B, C) by ``pool`` (``"token"``: the class
        token; ``"mean"``: the mean of the other tokens, or ``mean`` when given; ``"token_mean"``:
        both concatenated; ``"none"``: all tokens), then ``fc_norm``."""
        if self.pool in ("mean", "token_mean") and mean is None:
            mean = x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.pool == "token":
            x = x[:, 0]
        elif self.pool == "mean":
            x = mean
        elif self.pool == "token_mean":
            x = torch.cat([x[:, 0], mean], dim=-1)
        return self.fc_norm(x)

    # ---------------------------------------------------------------------------- optimizer

    def get_layer_id(self, param_name: str) -> int:
        """Layer id for layer-wise lr decay of a parameter named relative to the backbone: the
        embedding (``embed_names``) 0, block i -> i + 1, everything else (final norms) depth + 1
        (the optimizer gives necks and heads depth + 1 too)."""
        parts = param_name.split(".", 2)
        if parts[0] in self.embed_names:
            return 0
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        return self.depth + 1

    def no_weight_decay(self) -> set:
        """Names of parameters that get no weight decay (besides 1-D ones), relative to the
        backbone; the optimizer constructor reads them (timm's convention)."""
        return {n for n in self.no_decay_names if getattr(self, n, None) is not None}
