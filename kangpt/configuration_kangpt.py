"""Configuration of KAN-GPT-2: GPT-2's configuration plus the choice of feed-forward block."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .kan import kan_block_hidden_size
from .kan_spec import KANSpec

FFN_TYPES = ("kan", "mlp")


@strict
class KANGPT2Config(PreTrainedConfig):
    r"""Configuration of a KAN-GPT-2 model.

    GPT-2's fields keep GPT-2's names, defaults and ``attribute_map`` (``hidden_size``,
    ``num_hidden_layers``, ...); see ``transformers.GPT2Config``. The feed-forward block of every
    layer is chosen by:

    ffn_type (`str`, defaults to `"kan"`):
        `"kan"`: a KAN block (see ``kangpt.kan.KANFeedForward``); `"mlp"`: exactly GPT-2's MLP
        (``n_embd -> n_inner -> n_embd`` with ``activation_function``).
    kan_basis (`str`, defaults to `"bspline"`):
        One of `"bspline"`, `"rbf"`, `"chebyshev"`, `"rational"`, `"symbolic"` (a fitted formula per
        group, what ``kangpt inspect --symbolic`` makes of a trained model; see ``kangpt.kan_symbolic``).
    kan_sharing (`str`, defaults to `"group"`), kan_groups (`int`, defaults to 8):
        `"edge"`: one learnable function per edge (the KAN paper's layer); `"group"`: the inputs of
        every KAN layer are cut into ``kan_groups`` groups that share one learnable function, scaled
        per edge by the weight (GR-KAN's sharing), so the block is as wide as GPT-2's MLP. The
        `"rational"` and `"symbolic"` bases are always grouped.
    kan_grid_size (`int`, defaults to 5), kan_spline_order (`int`, defaults to 3),
    kan_grid_range (`list[float]`, defaults to `[-2.0, 2.0]`):
        Grid of the spline-like bases (see ``kangpt.kan.KANLinear``).
    kan_rational_order (`list[int]`, defaults to `[5, 4]`):
        Numerator and denominator degrees of the `"rational"` basis.
    kan_kernel (`str`, defaults to `"auto"`):
        `"auto"`: grouped B-spline layers run fused Triton kernels on CUDA when `triton` is installed
        (``kangpt.kan_triton``), PyTorch elsewhere; `"triton"`: always the kernels; `"torch"`: never.
    kan_dropout (`float`, defaults to 0.0):
        Dropout probability on the KAN block's hidden units, between its two KAN layers (a regulariser
        for many epochs of a small corpus; GPT-2's MLP has none there: its output dropout is
        ``resid_pdrop``, which the KAN block applies too).
    kan_hidden_size (`int` or `list[int]`, *optional*):
        Width ``h`` of the KAN block ``n_embd -> h -> n_embd``; ``0`` means a single
        ``n_embd -> n_embd`` KAN layer; a list gives one width per layer (e.g. after pruning).
        **Leave it unset (``None``) to get a KAN block whose parameter count matches GPT-2's MLP**
        (``n_embd -> n_inner -> n_embd``, biases included) within 1%; the matched width is computed
        when the config is built and stored, so a saved config holds the actual number.

    ``KANGPT2Config()`` is KAN-GPT-2 small: GPT-2 small's shape with parameter-matched KAN blocks.
    As ``GPT2Config``, it is a ``huggingface_hub`` strict dataclass: a value of the wrong type is
    refused when set (``StrictDataclassFieldValidationError``), and the ``validate_*`` methods check
    the values, again before saving. A bad value raises a ``ValueError`` that names the field.
    """

    model_type = "kangpt2"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float | int = 0.1
    embd_pdrop: float | int = 0.1
    attn_pdrop: float | int = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    ffn_type: str = "kan"
    kan_basis: str = "bspline"
    kan_grid_size: int = 5
    kan_spline_order: int = 3
    kan_grid_range: list[float | int] | tuple[float | int, float | int] = (-2.0, 2.0)
    kan_rational_order: list[int] | tuple[int, int] = (5, 4)
    kan_sharing: str = "group"
    kan_groups: int = 8
    kan_hidden_size: int | list[int] | None = None
    kan_kernel: str = "auto"
    kan_dropout: float | int = 0.0

    def __post_init__(self, **kwargs):
        if "kan_rational_groups" in kwargs:  # the name of kan_groups in configs saved by kangpt 0.1
            self.kan_groups = kwargs.pop("kan_rational_groups")
        self.kan_grid_range = [float(v) for v in self.kan_grid_range]
        self.kan_rational_order = [int(v) for v in self.kan_rational_order]
        # Checked here, before the matched width is computed from them, and so that a bad value is a
        # ValueError naming the field; @strict runs the same validators after __init__ and on saving.
        self.validate_shape()
        self.validate_feed_forward()
        if self.ffn_type == "kan" and self.kan_hidden_size is None:
            self.kan_hidden_size = (
                kan_block_hidden_size(self.n_embd, self.n_embd, self.mlp_num_parameters, spec=self.kan_spec())
                or 0
            )
        super().__post_init__(**kwargs)

    @property
    def mlp_num_parameters(self) -> int:
        """Parameters of GPT-2's MLP at this shape (weights and biases of c_fc and c_proj)."""
        inner = self.n_inner if self.n_inner is not None else 4 * self.n_embd
        return 2 * self.n_embd * inner + inner + self.n_embd

    def kan_spec(self, widths: dict[str, int] | None = None) -> KANSpec:
        """The settings of every KAN layer (the ``kan_*`` fields; a ``ValueError`` names a bad one),
        checked against the layers' input ``widths`` if given, by name (``{"n_embd": 768}``)."""
        try:
            spec = KANSpec(**{field: getattr(self, f"kan_{field}") for field in KANSpec.__dataclass_fields__})
            for name, width in (widths or {}).items():
                spec.check_width(width, name)
        except ValueError as err:  # the spec's message starts with the field's name
            raise ValueError(f"KANGPT2Config.kan_{err}") from None
        return spec

    def kan_hidden_size_of_layer(self, layer_idx: int) -> int:
        """KAN block width of layer ``layer_idx`` (0: a single KAN layer)."""
        if isinstance(self.kan_hidden_size, list):
            return self.kan_hidden_size[layer_idx]
        return self.kan_hidden_size

    def _need(self, ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"KANGPT2Config.{field} {rule}, got {getattr(self, field)!r}")

    def validate_shape(self) -> None:
        """GPT-2's fields: positive sizes, dropout probabilities in [0, 1), positive scales."""
        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            self._need(getattr(self, field) > 0, field, "must be a positive integer")
        self._need(self.n_inner is None or self.n_inner > 0, "n_inner", "must be None or > 0")
        for field in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            self._need(0 <= getattr(self, field) < 1, field, "must be in [0, 1)")
        self._need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be > 0")
        self._need(self.initializer_range > 0, "initializer_range", "must be > 0")

    def validate_feed_forward(self) -> None:
        """The block's kind, the KAN settings (``KANSpec``) and the KAN widths."""
        self._need(self.ffn_type in FFN_TYPES, "ffn_type", f"must be one of {FFN_TYPES}")
        self._need(0 <= self.kan_dropout < 1, "kan_dropout", "must be in [0, 1)")
        self.kan_spec()
        widths = self.kan_hidden_size if isinstance(self.kan_hidden_size, list) else [self.kan_hidden_size]
        self._need(all(w is None or w >= 0 for w in widths), "kan_hidden_size",
                   "must be None, an integer >= 0 or a list of them")
        if isinstance(self.kan_hidden_size, list):
            self._need(len(self.kan_hidden_size) == self.n_layer, "kan_hidden_size",
                       f"must have n_layer={self.n_layer} entries")

    def check_widths(self) -> None:
        """What the model's modules need of the widths, checked on the config alone (a run config is
        checked without building its model): ``n_head`` divides ``n_embd`` and a grouped KAN layer's
        groups divide its inputs (``n_embd``, each block's ``kan_hidden_size``). Not a validator of
        the config: like GPT2Config, it accepts such widths, and the modules refuse them when built."""
        self._need(self.n_embd % self.n_head == 0, "n_head", f"must divide n_embd={self.n_embd}")
        if self.ffn_type == "kan":
            for layer in range(self.n_layer if isinstance(self.kan_hidden_size, list) else 1):
                self.kan_spec(self.kan_widths(layer))

    def kan_widths(self, layer_idx: int) -> dict[str, int]:
        """The input widths of block ``layer_idx``'s KAN layers, by the config's field names."""
        hidden = self.kan_hidden_size_of_layer(layer_idx)
        return {"n_embd": self.n_embd, **({"kan_hidden_size": hidden} if hidden else {})}


__all__ = ["KANGPT2Config"]
