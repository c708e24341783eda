"""HeadMap: which heads are retrieval heads for one model, as a versioned JSON artifact.

The one artifact the profiling worker publishes and the service loads. It validates on load: a map for
another model, or with scores or head lists of the wrong shape, raises `HeadMapError`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import CompressionParams
from .models import ModelFingerprint

SCHEMA_VERSION = 1


class HeadMapError(ValueError):
    """A head map that cannot be used with this model; the message says why."""


@dataclass
class HeadMap:
    fingerprint: ModelFingerprint
    induction: list[list[float]]                 # [n_layers][n_heads]
    echo: list[list[float]]                      # [n_layers][n_heads]
    retrieval_q_heads: list[tuple[int, int]]     # (layer, query head) selected by score
    retrieval_kv_heads: list[list[int]]          # [n_layers][...] KV heads kept in full
    compression: CompressionParams = field(default_factory=CompressionParams)
    method: str = "razor"
    method_params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    calibration: dict | None = None
    created_at: float = field(default_factory=time.time)
    version: str = ""

    def __post_init__(self):
        self.retrieval_q_heads = [tuple(x) for x in self.retrieval_q_heads]
        self.retrieval_kv_heads = [sorted(set(h)) for h in self.retrieval_kv_heads]
        self.validate(self.fingerprint)
        self.version = self.version or self.content_version()

    @classmethod
    def full(cls, fp: ModelFingerprint, compression: CompressionParams | None = None) -> "HeadMap":
        """Every KV head is a retrieval head: the compressed path equals the full cache."""
        zeros = [[0.0] * fp.n_heads for _ in range(fp.n_layers)]
        return cls(fp, zeros, zeros, [(l, h) for l in range(fp.n_layers) for h in range(fp.n_heads)],
                   [list(range(fp.n_kv_heads)) for _ in range(fp.n_layers)],
                   compression or CompressionParams(), method="full")

    @property
    def kv_fraction(self) -> float:
        """Fraction of KV heads kept in full."""
        return sum(map(len, self.retrieval_kv_heads)) / (self.fingerprint.n_layers * self.fingerprint.n_kv_heads)

    def content_version(self) -> str:
        """Same model, selection and parameters -> same version (makes publishing idempotent)."""
        body = {k: v for k, v in self.to_dict().items() if k not in ("version", "created_at", "timings")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    # --- validation ---------------------------------------------------------------------------
    def validate(self, expect: ModelFingerprint) -> None:
        fp = self.fingerprint
        if fp != expect:
            raise HeadMapError(f"head map is for model {fp.id}, not {expect.id}; profile this model "
                               f"(ProfileModel or `razor-engine profile`) to get its own map")
        for name, scores in (("induction", self.induction), ("echo", self.echo)):
            if (not isinstance(scores, (list, tuple)) or len(scores) != fp.n_layers
                    or any(not isinstance(row, (list, tuple)) or len(row) != fp.n_heads for row in scores)):
                raise HeadMapError(f"{name} scores must be [{fp.n_layers}][{fp.n_heads}] for this model")
            bad = [x for row in scores for x in row if not _is_number(x)]
            if bad:
                raise HeadMapError(f"{name} scores must be numbers, got {bad[0]!r}")
        if len(self.retrieval_kv_heads) != fp.n_layers:
            raise HeadMapError(f"retrieval_kv_heads needs one list per layer ({fp.n_layers}), "
                               f"got {len(self.retrieval_kv_heads)}")
        bad = [h for heads in self.retrieval_kv_heads for h in heads if not _is_index(h)]
        if bad:
            raise HeadMapError(f"retrieval_kv_heads must hold integer head indices, got {bad[0]!r}")
        if any(not 0 <= h < fp.n_kv_heads for heads in self.retrieval_kv_heads for h in heads):
            raise HeadMapError(f"retrieval_kv_heads has a head outside 0..{fp.n_kv_heads - 1}")
        bad = [x for x in self.retrieval_q_heads if len(x) != 2 or not all(map(_is_index, x))]
        if bad:
            raise HeadMapError(f"retrieval_q_heads must hold [layer, head] pairs of integers, got {list(bad[0])!r}")
        if any(not (0 <= l < fp.n_layers and 0 <= h < fp.n_heads) for l, h in self.retrieval_q_heads):
            raise HeadMapError("retrieval_q_heads has a (layer, head) outside the model")

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "version": self.version, "created_at": self.created_at,
                "fingerprint": self.fingerprint.to_dict(), "method": self.method,
                "method_params": self.method_params, "compression": self.compression.to_dict(),
                "induction": self.induction, "echo": self.echo,
                "retrieval_q_heads": [list(x) for x in self.retrieval_q_heads],
                "retrieval_kv_heads": self.retrieval_kv_heads, "kv_fraction": round(self.kv_fraction, 6),
                "timings": self.timings, "calibration": self.calibration}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, expect: ModelFingerprint | None = None) -> "HeadMap":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HeadMapError(f"head map is not valid JSON: {e}") from None
        except RecursionError:
            raise HeadMapError("head map is not valid JSON: nested too deeply") from None
        if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
            raise HeadMapError(f"head map schema_version must be {SCHEMA_VERSION}")
        try:
            hm = cls(ModelFingerprint.from_dict(d["fingerprint"]), d["induction"], d["echo"],
                     d["retrieval_q_heads"], d["retrieval_kv_heads"], CompressionParams(**d["compression"]),
                     d.get("method", "razor"), d.get("method_params", {}), d.get("timings", {}),
                     d.get("calibration"), d.get("created_at", 0.0), d.get("version", ""))
        except HeadMapError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise HeadMapError(f"head map is malformed: {e!r}") from None
        if expect is not None:
            hm.validate(expect)
        return hm

    # --- picture ------------------------------------------------------------------------------
    def render_png(self, path) -> None:
        """Induction and echo scores as layers x heads heatmaps; selected query heads boxed."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 0.25 * self.fingerprint.n_layers + 2))
        for ax, name, scores in ((axes[0], "induction", self.induction), (axes[1], "echo", self.echo)):
            im = ax.imshow(scores, aspect="auto", cmap="viridis", origin="lower")
            for layer, head in self.retrieval_q_heads:
                ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.0))
            group = self.fingerprint.group_size
            for layer, kv_heads in enumerate(self.retrieval_kv_heads):
                for kv in kv_heads:  # the query heads that read a KV head kept in full
                    ax.add_patch(plt.Rectangle((kv * group - 0.5, layer - 0.5), group, 1, fill=False,
                                               ec="white", lw=2.0, ls="--"))
            ax.set(title=f"{name} score", xlabel="query head", ylabel="layer")
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"{self.fingerprint.id} ({self.method}): red = {len(self.retrieval_q_heads)} query heads "
                     f"selected by score, white dashed = KV heads kept full ({self.kv_fraction:.0%})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _is_index(x) -> bool:
    """A head or layer index: an int, not a bool (True would pass as head 1) nor a float (0.5 would be truncated)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


SHIPPED_DIR = Path(__file__).with_name("data")


def shipped_head_map(fp: ModelFingerprint) -> HeadMap | None:
    """The head map shipped with the package for this model (the embedded SmolLM2), if any."""
    for path in sorted(SHIPPED_DIR.glob("*.headmap.json")):
        hm = HeadMap.from_json(path.read_text())
        if hm.fingerprint == fp:
            return hm
    return None
