"""A feature-conditioned draft (EAGLE-style; Li et al. 2024, arXiv 2401.15077): one decoder layer that reads the
target's own final hidden state.

To propose the token after x_t it takes the embedding of x_t and the target's feature f_{t-1} (its final,
normed hidden state where it chose x_t, which the verify pass computes anyway), fuses them with one linear
layer, runs one Llama-style decoder layer with its own KV cache, and predicts the target's feature f_t; the
target's (tied) head, restricted to the tokens the target emits most, turns that into logits. Drafting on,
the draft feeds its own predicted feature where the target's is not known yet.

The module speaks the decode loop's language: `step(tokens, features, cache)` returns full-vocabulary logits
(-inf outside the restricted head, so argmax, softmax, signals and rejection sampling work unchanged) and
the predicted feature of the last position. `hidden(...)` is the batched form that training and the dense
traces use, with an explicit attention mask. Saved as `feature_draft.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from speckv.profiling.errors import SpeckvError
from torch import nn

CONFIG_FILE = "feature_draft.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class FeatureDraftConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    head_size: int  # rows of the restricted head
    target_name: str = ""  # what the draft was trained against (documentation; shapes are checked)

    @classmethod
    def from_target(cls, config, head_size: int, target_name: str = "") -> FeatureDraftConfig:
        """The shapes of one decoder layer of the target (a Llama-style transformers config)."""
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            vocab_size=config.vocab_size,
            head_size=head_size,
            target_name=target_name,
        )


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FeatureCache:
    """The draft layer's keys and values, [batch, kv heads, positions, head dim]; `crop` rolls back."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def crop(self, length: int) -> None:
        if self.keys is not None and self.keys.shape[2] > length:
            self.keys = self.keys[:, :, :length]
            self.values = self.values[:, :, :length]


class FeatureDraft(nn.Module):
    """Embedding + target feature -> fuse -> one decoder layer -> norm -> restricted head."""

    def __init__(self, config: FeatureDraftConfig) -> None:
        super().__init__()
        self.config = config
        h, nh, nkv, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.embed = nn.Embedding(config.vocab_size, h)
        self.fuse = nn.Linear(2 * h, h)
        self.input_norm = _RMSNorm(h, config.rms_norm_eps)
        self.q_proj = nn.Linear(h, nh * d, bias=False)
        self.k_proj = nn.Linear(h, nkv * d, bias=False)
        self.v_proj = nn.Linear(h, nkv * d, bias=False)
        self.o_proj = nn.Linear(nh * d, h, bias=False)
        self.post_norm = _RMSNorm(h, config.rms_norm_eps)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)
        self.norm = _RMSNorm(h, config.rms_norm_eps)
        self.head = nn.Linear(h, config.head_size, bias=False)
        self.register_buffer("head_ids", torch.arange(config.head_size, dtype=torch.long))
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.fuse.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fuse.weight.dtype

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, d] rotated by the angles of positions [B, T] (Llama's half-split convention)."""
        angles = positions[:, None, :, None].float() * self.inv_freq
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def project(
        self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's residual input, queries, and this block's keys and values ([B, heads, T, d])."""
        b, t = tokens.shape
        cfg = self.config
        x = self.fuse(torch.cat([self.embed(tokens), features.to(self.dtype)], dim=-1))
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        return x, self._rope(q, positions), self._rope(k, positions), v

    def finish(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention over `keys`/`values` (mask [B, T, S] bool, True = visible; None = all), MLP, final norm."""
        b, _, t, _ = q.shape
        attn = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=None if mask is None else mask[:, None], enable_gqa=True
        )
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.post_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.norm(x)

    def hidden(
        self, tokens: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced predicted features for whole sequences [B, T] (positions 0..T-1, causal unless
        `mask` [B, T, T] says otherwise): the training pass."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        x, q, k, v = self.project(tokens, features, positions)
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril().expand(b, t, t)
        return self.finish(x, q, k, v, mask)

    def full_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of predicted features: the restricted head's, -inf elsewhere."""
        restricted = self.head(features).float()
        full = restricted.new_full((*restricted.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.head_ids, restricted)

    def step(
        self, tokens: list[int], features: torch.Tensor, cache: FeatureCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `tokens` with their input features [T, H] after what `cache` holds (batch 1): the full-vocab
        logits and the predicted feature of the last position."""
        start = cache.get_seq_length()
        t = len(tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + t, device=self.device)[None]
        x, q, k, v = self.project(ids, features[None], positions)
        keys, values = cache.append(k, v)
        # One layer: a position's key and value depend on its input alone, so earlier positions of `tokens`
        # only fill the cache and the last one attends to everything cached (no mask needed).
        out = self.finish(x[:, -1:], q[:, :, -1:], keys, values, None)
        feature = out[0, -1]
        return self.full_logits(feature), feature

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def forward_with_features(model, ids: list[int], cache, device: torch.device, all_logits: bool):
    """The decode loop's target forward (`kv_cache.forward`) that also returns the final (normed) hidden state
    of every fed position, [len(ids), H]: the features a feature draft reads. The head is applied here, as
    the model's own forward applies it (Llama-style targets: logits = head(final hidden))."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    hidden = model.model(input_ids=input_ids, past_key_values=cache, use_cache=True).last_hidden_state[0]
    logits = model.get_output_embeddings()(hidden if all_logits else hidden[-1:])
    return (logits if all_logits else logits[-1]), hidden


class TargetFeatures:
    """The target's features of committed positions that a feature draft has not read yet.

    Invariant: features of positions 0 .. n-2 are known when n tokens are committed (the last token's
    feature comes with the next verify); rows before `start` were read and are dropped."""

    def __init__(self, hidden_size: int, device: torch.device) -> None:
        self.rows = torch.zeros(0, hidden_size, device=device)
        self.start = 0  # position of rows[0]

    def extend(self, rows: torch.Tensor) -> None:
        self.rows = torch.cat([self.rows, rows.float()])

    def inputs(self, first: int, end: int) -> torch.Tensor:
        """Input features of positions first..end-1: f_{j-1} for position j, zeros for position 0."""
        rows = self.rows[max(first - 1, 0) - self.start : end - 1 - self.start]
        if first == 0:
            rows = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])
        return rows

    def drop_before(self, position: int) -> None:
        if position > self.start:
            self.rows = self.rows[position - self.start :]
            self.start = position


def is_feature_draft(model) -> bool:
    """Whether `model` is a feature draft (it reads the target's hidden states) rather than a causal LM."""
    return isinstance(model, FeatureDraft)


def shifted_features(features: torch.Tensor) -> torch.Tensor:
    """Input features [..., T, H] from target features [..., T, H]: position t reads f_{t-1}, position 0 zeros."""
    return torch.cat([torch.zeros_like(features[..., :1, :]), features[..., :-1, :]], dim=-2)


def is_feature_draft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_feature_draft(path: str | Path, device: torch.device) -> FeatureDraft:
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = FeatureDraftConfig(**json.loads((path / CONFIG_FILE).read_text()))
        state = load_file(str(path / WEIGHTS_FILE))
        model = FeatureDraft(config).to(state["fuse.weight"].dtype)
        model.load_state_dict(state)  # RuntimeError on missing, unexpected or mis-shaped weights
    except (OSError, TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise SpeckvError(f"cannot load the feature draft in {path}: {exc}") from exc
    model.to(device).eval().requires_grad_(False)
    return model


def check_target(draft: FeatureDraft, target) -> None:
    """A feature draft reads the target's hidden states and shares its vocabulary: refuse any other target."""
    tc = target.config
    if tc.hidden_size != draft.config.hidden_size or tc.vocab_size != draft.config.vocab_size:
        raise SpeckvError(
            f"the feature draft was trained for a target with hidden size {draft.config.hidden_size} and "
            f"{draft.config.vocab_size} tokens; this target has {tc.hidden_size} and {tc.vocab_size}"
        )
