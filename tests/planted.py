"""A tiny Llama whose weights are set by hand so that chosen heads are induction / echo heads.

Tests of the RazorAttention profiler need a model whose retrieval heads are known. Every
weight starts small and random (transformers' own init, seeded); then a few heads are
overwritten. They talk through reserved residual slots that no random weight writes into:

- ``one``: a constant 1 in every embedding (RMSNorm keeps it constant), so a projection of it
  is a position-independent q or k: a bias without ``attention_bias``.
- ``token``: a random unit code of the token id (zero for BOS); ``bos``: 1 for BOS only.
- ``prev``: the code of the previous token, written by a previous-token head (layer 0, head 0).
- ``count`` / ``clock`` (only with an echo head): how many earlier copies of this token
  there are, as 1/(copies + 2) and as a unit vector at angle ``CLOCK_STEP * copies``.
- ``out`` (only with ``copy_output``): the token code the induction head copied; the (untied)
  ``lm_head`` reads it, so the prediction is that token (logit ``COPY_LOGIT`` x cosine).

RoPE (Llama's ``rotate_half`` layout: pair p is head dims ``p`` and ``p + head_dim/2``, angle
``pos * theta**(-2p/head_dim)``) makes constant q/k a function of ``delta = q_pos - k_pos``: per
pair, ``q.k = Re(z_q * conj(z_k) * exp(i*w*delta))``. With ``rope_theta = 1e9`` the pairs split
into fast ones (positional patterns), one slow "recency" pair and near-static ones, where
content matching survives any distance up to ``MAX_LEN``.

- previous-token head: fast pairs with a trigonometric profile that peaks at ``delta == 1``;
  its value copies ``token`` into ``prev``.
- induction head: q = code(token[m]), k = code(token[n-1]) in the static pairs, so it attends
  to the token after an earlier copy; a linear recency penalty picks the latest copy. Its
  value/output circuit is zero unless ``copy_output``: then v = code(token[n]) and o writes it
  into ``out``, so after a repeated token the model predicts what followed it last time.
- echo head: q = code(token[m]), k = code(token[n]) matches itself and every earlier copy, so
  it adds a clock term that peaks where the key has exactly one copy fewer: the previous copy.
  The clock comes from a copy-counting head in layer 0 (it attends equally to BOS and to every
  copy of its token, so its BOS weight is 1/(copies + 2)) and step units in layer 0's MLP.

Logits are large (tens to a few hundred) by design: use float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROPE_THETA = 1e9
MAX_LEN = 1100  # the induction head stays sharp up to this many tokens
ECHO_MAX_LEN = 400  # the copy counter drifts beyond this (RoPE turns the static pairs a little)
MAX_COPIES = 7  # the clock counts up to this many earlier copies (8 repeats)
PREV_HEAD = (0, 0)  # (layer, query head) of the previous-token head
PREV_LOGIT = 100.0  # scale of the previous-token profile (its margin is ~0.17 of this)
CONTENT_LOGIT = 200.0  # an exact token-code match, induction and echo heads
RECENCY = 0.12  # induction logits lost per position of distance
COUNT_LOGIT = 60.0  # the copy counter's match (and BOS) logit
CLOCK_LOGIT = 60.0  # the echo head's bonus for "one copy fewer than me"
CLOCK_STEP = 2 * math.pi / (MAX_COPIES + 2)
COPY_LOGIT = 60.0  # lm_head logit of a perfectly copied code (nearest other codes: ~0.7 of this)
# With copy_output the induction head matches harder: a copy ~1000 tokens back (recency -120)
# must still beat near-miss codes (cosine ~0.75) close by, or the copied answer is wrong.
COPY_CONTENT_LOGIT = 320.0


@dataclass(frozen=True)
class PairRoles:
    """Which RoPE pairs of a head do what, from their angular speeds over MAX_LEN."""

    fast: tuple[int, ...]  # positional profiles
    recency: int  # sin(w * delta) is close to linear over MAX_LEN
    code: tuple[int, ...]  # token codes
    still: int  # the slowest pair: BOS detector (counter) and clock (echo head)
    omega: tuple[float, ...]

    @staticmethod
    def of(head_dim: int) -> "PairRoles":
        omega = tuple(ROPE_THETA ** (-2 * p / head_dim) for p in range(head_dim // 2))
        static = [p for p, w in enumerate(omega) if w * MAX_LEN < 0.5]
        recency = min(p for p, w in enumerate(omega) if w * MAX_LEN <= 2.0)
        if len(static) < 5 or recency < 3 or recency in static:
            raise ValueError(f"head_dim={head_dim} is too small to plant heads; use 32 or more")
        return PairRoles(tuple(range(recency)), recency, tuple(static[:-1]), static[-1], omega)

    @property
    def code_dim(self) -> int:
        return 2 * len(self.code)


@lru_cache(maxsize=4)
@torch.enable_grad()
def peak_profile(omegas: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    """Per-pair (a, b), sum |a|+|b| = 1, of f(d) = sum a cos(w d) + b sin(w d), with f(1) above
    f at every other d in [0, MAX_LEN] by as much as possible (~0.17 for head_dim 32).

    A small deterministic gradient ascent in float64 (~0.2 s), cached.
    """
    d = torch.arange(0, MAX_LEN + 1, dtype=torch.float64)
    w = torch.tensor(omegas, dtype=torch.float64)[:, None]
    basis = torch.cat([torch.cos(w * d), torch.sin(w * d)])  # [2P, MAX_LEN + 1]
    gen = torch.Generator().manual_seed(0)
    z = (0.1 * torch.randn(basis.shape[0], generator=gen, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(400):
        f = (z / z.abs().sum()) @ basis
        others = torch.cat([f[:1], f[2:]])
        loss = torch.logsumexp(others * 300, 0) / 300 - f[1]  # smooth max of the sidelobes
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = (z / z.abs().sum()).detach()
    return tuple((c[p].item(), c[len(omegas) + p].item()) for p in range(len(omegas)))


def build_planted_llama(
    induction_head: tuple[int, int] = (1, 2),
    echo_head: tuple[int, int] | None = None,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 32,
    vocab_size: int = 256,
    seed: int = 0,
    bos_token_id: int = 0,
    copy_output: bool = False,
) -> LlamaForCausalLM:
    """A float32 eval-mode Llama (GQA) with a planted induction head and optionally an echo head.

    Heads are (layer, query head). Layer 0 is reserved for helpers: query head 0 is the
    previous-token head and, with an echo head, the first query head of KV head 1 counts
    copies. So the induction and echo heads sit in layers >= 1 on distinct KV heads.
    Deterministic for a given seed; works with "eager" and "sdpa" (the default).
    With ``copy_output`` the induction head also drives the logits (a copy task's greedy answer
    is the token that followed the earlier copy); without it the head changes nothing downstream.
    """
    roles = PairRoles.of(head_dim)
    _check_heads(induction_head, echo_head, n_layers, n_heads, n_kv_heads)
    code_slots = 3 if copy_output else 2  # token, prev (, out)
    hidden = max(n_heads * head_dim, _round_up(code_slots * roles.code_dim + 16, n_heads))
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=None, pad_token_id=None,
    )
    if not 0 <= bos_token_id < vocab_size:
        raise ValueError(f"bos_token_id {bos_token_id} is outside the vocabulary of {vocab_size}")
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    codes = _token_codes(vocab_size, roles.code_dim, seed, bos_token_id)
    with torch.no_grad():
        copy_layer = induction_head[0] if copy_output else None
        planter = _Planter(model, roles, codes, echo=echo_head is not None, copy_layer=copy_layer)
        planter.previous_token_head(*PREV_HEAD)
        planter.induction_head(*induction_head, COPY_CONTENT_LOGIT if copy_output else CONTENT_LOGIT)
        if copy_output:
            planter.copy_circuit(*induction_head)
        if echo_head is not None:
            planter.copy_counter(0, n_heads // n_kv_heads)
            planter.echo_head(*echo_head)
    return model


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def _check_heads(induction, echo, n_layers, n_heads, n_kv_heads) -> None:
    if n_layers < 2 or n_heads % n_kv_heads or n_heads <= n_kv_heads:
        raise ValueError("need n_layers >= 2 and GQA: n_heads a multiple of n_kv_heads, larger")
    group = n_heads // n_kv_heads
    planted = [tuple(induction)] + ([tuple(echo)] if echo is not None else [])
    for layer, head in planted:
        if not (1 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"planted head ({layer}, {head}) must be in layers 1..{n_layers - 1}"
                             f" and heads 0..{n_heads - 1}: layer 0 holds the helper heads")
    if len({(layer, head // group) for layer, head in planted}) != len(planted):
        raise ValueError(f"induction and echo heads {planted} share a KV head (group size {group})")
    if echo is not None and n_kv_heads < 2:
        raise ValueError("an echo head needs n_kv_heads >= 2 (layer 0 needs two helper KV heads)")


def _token_codes(vocab_size: int, dim: int, seed: int, bos: int) -> torch.Tensor:
    """[V, dim] random unit codes; BOS gets none (the bos slot marks it)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.nn.functional.normalize(torch.randn(vocab_size, dim, generator=gen), dim=1)
    codes[bos] = 0
    return codes


class _Planter:
    """Writes the planted weights into a freshly initialised model (call inside no_grad)."""

    def __init__(self, model: LlamaForCausalLM, roles: PairRoles, codes: torch.Tensor, echo: bool,
                 copy_layer: int | None = None):
        cfg = model.config
        self.model, self.roles, self.echo, self.codes = model, roles, echo, codes
        self.copy_layer = copy_layer  # the layer whose induction head writes `out`, if any
        self.hd, self.hidden = cfg.head_dim, cfg.hidden_size
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        e = roles.code_dim
        self.one, self.bos, self.count = 0, 1, 2
        self.clock = slice(3, 5)
        self.token, self.prev = slice(5, 5 + e), slice(5 + e, 5 + 2 * e)
        self.out = slice(5 + 2 * e, 5 + 3 * e) if copy_layer is not None else slice(self.prev.stop, self.prev.stop)
        reserved = slice(0, self.out.stop)
        for layer in model.model.layers:  # random parts never write into reserved slots
            layer.self_attn.o_proj.weight[reserved] = 0
            layer.mlp.down_proj.weight[reserved] = 0
        emb = model.model.embed_tokens.weight
        emb[:, reserved] = 0
        self.free_norm2 = (self.hidden - reserved.stop) * cfg.initializer_range**2
        # every embedding gets the same norm: the copy counter compares logits of 60 exactly
        emb[:, reserved.stop:] *= self.free_norm2**0.5 / emb[:, reserved.stop:].norm(dim=1, keepdim=True)
        emb[:, self.one] = 1.0
        emb[:, self.token] = codes
        emb[cfg.bos_token_id, self.bos] = 1.0

    def _gain(self, layer: int, after_attention: bool = False) -> float:
        """RMSNorm's scale: slots one + token (+ prev, count) (+ clock after layer 0), ~unit each."""
        norm2 = 2.0 + self.free_norm2
        if layer >= 1 or after_attention:
            norm2 += 1.0 + (0.1 if self.echo else 0.0)  # prev; count is 1/(copies + 2)
        if layer >= 1 and self.echo:
            norm2 += 1.0  # clock
        if self.copy_layer is not None and layer > self.copy_layer:
            norm2 += 1.0  # out: a copied unit code
        return (self.hidden / norm2) ** 0.5

    def _attn(self, layer: int):
        return self.model.model.layers[layer].self_attn

    def _clear(self, layer: int, head: int) -> tuple[int, int]:
        """Zero this q head and its KV head's k/v; quiet the q of heads sharing that KV head."""
        attn, hd, kv = self._attn(layer), self.hd, head // self.group
        for sib in range(kv * self.group, (kv + 1) * self.group):
            attn.q_proj.weight[sib * hd:(sib + 1) * hd] *= 0.01
        attn.q_proj.weight[head * hd:(head + 1) * hd] = 0
        attn.k_proj.weight[kv * hd:(kv + 1) * hd] = 0
        attn.v_proj.weight[kv * hd:(kv + 1) * hd] = 0
        return head * hd, kv * hd

    def _pair(self, layer, q0, k0, p, q_from: dict, k_from: dict, logit: float) -> None:
        """On RoPE pair p, z_q = sum (a + ib) x[slot] over q_from, z_k likewise over k_from:
        q.k / sqrt(hd) = logit * Re(z_q * conj(z_k) * exp(i w delta))."""
        attn, half, g = self._attn(layer), self.hd // 2, self._gain(layer)
        scale = (logit * self.hd**0.5) ** 0.5 / g
        for proj, row0, slots in ((attn.q_proj, q0, q_from), (attn.k_proj, k0, k_from)):
            for slot, (a, b) in slots.items():
                proj.weight[row0 + p, slot] = a * scale
                proj.weight[row0 + p + half, slot] = b * scale

    def _content(self, layer, q0, k0, key_slot: slice, logit: float) -> None:
        """q = code(token) and k = code in key_slot, on the code pairs: logit * cosine."""
        attn, half, g = self._attn(layer), self.hd // 2, self._gain(layer)
        amp = (logit * self.hd**0.5) ** 0.5 / g
        dims = [d for p in self.roles.code for d in (p, p + half)]
        for j, dim in enumerate(dims):
            attn.q_proj.weight[q0 + dim, self.token.start + j] = amp
            attn.k_proj.weight[k0 + dim, key_slot.start + j] = amp

    def previous_token_head(self, layer: int, head: int) -> None:
        q0, k0 = self._clear(layer, head)
        pairs = self.roles.fast + (self.roles.recency,)
        profile = peak_profile(tuple(self.roles.omega[p] for p in pairs))
        for p, (a, b) in zip(pairs, profile):
            norm = math.hypot(a, b)  # q = sqrt(norm), k = (a, b) / sqrt(norm): a cos + b sin
            if norm > 1e-9:
                self._pair(layer, q0, k0, p, {self.one: (1.0, 0.0)}, {self.one: (a / norm, b / norm)},
                           PREV_LOGIT * norm)
        attn, e, g = self._attn(layer), self.roles.code_dim, self._gain(layer)
        attn.v_proj.weight[k0:k0 + e, self.token] = torch.eye(e) / g  # v = code(token)
        attn.o_proj.weight[:, q0:q0 + self.hd] = 0
        attn.o_proj.weight[self.prev, q0:q0 + e] = torch.eye(e)

    def induction_head(self, layer: int, head: int, content_logit: float = CONTENT_LOGIT) -> None:
        q0, k0 = self._clear(layer, head)
        self._content(layer, q0, k0, self.prev, content_logit)
        w = self.roles.omega[self.roles.recency]  # -(RECENCY / w) sin(w delta) ~ -RECENCY * delta
        self._pair(layer, q0, k0, self.roles.recency, {self.one: (1.0, 0.0)}, {self.one: (0.0, -1.0)},
                   RECENCY / w)

    def copy_circuit(self, layer: int, head: int) -> None:
        """v = code(token) of the attended key, o writes it into `out`; lm_head reads `out` only
        (plus its small random part on free slots), so logits are COPY_LOGIT x code cosine."""
        attn, e, g = self._attn(layer), self.roles.code_dim, self._gain(layer)
        kv = head // self.group
        q0, k0 = head * self.hd, kv * self.hd
        attn.v_proj.weight[k0:k0 + e, self.token] = torch.eye(e) / g
        for sib in range(kv * self.group, (kv + 1) * self.group):
            attn.o_proj.weight[:, sib * self.hd:(sib + 1) * self.hd] = 0  # siblings share this v: mute them
        attn.o_proj.weight[self.out, q0:q0 + e] = torch.eye(e)
        lm_head, g_final = self.model.lm_head.weight, self._gain(self.model.config.num_hidden_layers)
        lm_head[:, :self.out.stop] = 0
        lm_head[:, self.out] = self.codes * (COPY_LOGIT / g_final)

    def copy_counter(self, layer: int, head: int) -> None:
        """Attends equally to BOS and to each copy of its token; writes its BOS weight to count."""
        q0, k0 = self._clear(layer, head)
        self._content(layer, q0, k0, self.token, COUNT_LOGIT)
        self._pair(layer, q0, k0, self.roles.still, {self.one: (1.0, 0.0)}, {self.bos: (1.0, 0.0)}, COUNT_LOGIT)
        attn = self._attn(layer)
        attn.v_proj.weight[k0, self.bos] = 1.0 / self._gain(layer)
        attn.o_proj.weight[:, q0:q0 + self.hd] = 0
        attn.o_proj.weight[self.count, q0] = 1.0
        self._clock_units(layer)

    def _clock_units(self, layer: int) -> None:
        """MLP steps S_k = [copies >= k] (count < t_k) add u(k) - u(k-1) to the clock slot, so it
        holds u(copies) = (cos, sin)(CLOCK_STEP * copies). A step is silu(z + 1) - silu(z)."""
        mlp, g = self.model.model.layers[layer].mlp, self._gain(layer, after_attention=True)
        mlp.gate_proj.weight[:2 * (MAX_COPIES + 1)] = 0
        mlp.up_proj.weight[:2 * (MAX_COPIES + 1)] = 0
        mlp.down_proj.weight[:, :2 * (MAX_COPIES + 1)] = 0
        sharp = 2000.0  # z per unit of count; gaps between counts are >= 0.01
        for k in range(MAX_COPIES + 1):
            t = 1.0 if k == 0 else (1 / (k + 1) + 1 / (k + 2)) / 2
            step = [math.cos(CLOCK_STEP * k), math.sin(CLOCK_STEP * k)]
            if k:
                step = [step[0] - math.cos(CLOCK_STEP * (k - 1)), step[1] - math.sin(CLOCK_STEP * (k - 1))]
            for unit, (shift, sign) in enumerate(((1.0, 1.0), (0.0, -1.0))):
                row = 2 * k + unit
                mlp.gate_proj.weight[row, self.count] = -sharp / g
                mlp.gate_proj.weight[row, self.one] = (sharp * t + shift) / g
                mlp.up_proj.weight[row, self.one] = sign / g
                mlp.down_proj.weight[self.clock, row] = torch.tensor(step)

    def echo_head(self, layer: int, head: int) -> None:
        q0, k0 = self._clear(layer, head)
        self._content(layer, q0, k0, self.token, CONTENT_LOGIT)
        c, s = math.cos(CLOCK_STEP), math.sin(CLOCK_STEP)
        u0, u1 = self.clock.start, self.clock.start + 1
        # z_q = u(copies of m), z_k = e^{i step} u(copies of n) = u(copies of n + 1)
        self._pair(layer, q0, k0, self.roles.still, {u0: (1.0, 0.0), u1: (0.0, 1.0)},
                   {u0: (c, s), u1: (-s, c)}, CLOCK_LOGIT)
