"""Plain-numpy reference implementations, written independently of model/ (loops, float64)."""

import numpy as np


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x: [T, H] for one head; pairs (i, i + H/2) rotate by positions * theta^(-2i/H)."""
    t_len, h = x.shape
    out = x.astype(np.float64).copy()
    for t in range(t_len):
        for i in range(h // 2):
            angle = positions[t] * theta ** (-2.0 * i / h)
            a, b = x[t, i], x[t, i + h // 2]
            out[t, i] = a * np.cos(angle) - b * np.sin(angle)
            out[t, i + h // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def attention(x, wq, wk, wv, wo, positions, segment_ids, theta):
    """One sequence. x: [T, D]; wq: [D, N, H]; wk/wv: [D, K, H]; wo: [N, H, D]."""
    t_len = x.shape[0]
    n, k = wq.shape[1], wk.shape[1]
    h = wq.shape[2]
    x = x.astype(np.float64)
    out = np.zeros((t_len, n, h))
    for head in range(n):
        kv = head // (n // k)  # query heads are grouped contiguously per kv head
        q = rope(x @ wq[:, head], positions, theta)
        key = rope(x @ wk[:, kv], positions, theta)
        val = x @ wv[:, kv]
        for t in range(t_len):
            allowed = [
                s for s in range(t + 1) if segment_ids[s] == segment_ids[t] and segment_ids[s] != 0
            ]
            if not allowed:
                continue
            scores = np.array([q[t] @ key[s] / np.sqrt(h) for s in allowed])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[t, head] = sum(w * val[s] for w, s in zip(weights, allowed, strict=True))
    return np.einsum("tnh,nhd->td", out, wo)


def rms_norm(x, scale, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def silu(x):
    return x / (1.0 + np.exp(-x))


def transformer_logits(params, cfg, tokens, positions, segment_ids):
    """Full LM forward for one sequence from per-layer (unstacked) params. tokens: [T]."""
    x = np.asarray(params["embedding"], np.float64)[tokens]
    for i in range(cfg.num_layers):
        p = params[f"layers_{i}"]
        h = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
        a = p["attn"]
        x = x + attention(h, a["q"], a["k"], a["v"], a["o"], positions, segment_ids, cfg.rope_theta)
        h = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
        m = p["mlp"]
        x = x + (silu(h @ m["gate"]) * (h @ m["up"])) @ m["down"]
    x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
    head = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
    return x @ np.asarray(head, np.float64)
