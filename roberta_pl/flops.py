"""Training FLOPs of our masked LMs per token, for MFU (``ThroughputLogger``) and planning (``roberta-pl-plan``).

Matmuls count 2 FLOPs per multiply-accumulate, and training 3x the forward (backward twice). Torch-free arithmetic on a
:class:`~roberta_pl.model.RobertaConfig` (which re-exports both functions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from roberta_pl.model import RobertaConfig


def mlm_flops_per_token(config: RobertaConfig, seq_len: int, mask_prob: float = 0.15, sparse: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls as 2 FLOPs per MAC.

    Per layer forward: 24*H^2 (QKV, output, 2 FFN matmuls with FFN=4H generalised to 8*H*F + 8*H^2)
    plus 4*T*H for attention scores and values. The head: 2*H^2 (dense) + 2*H*V (decoder), applied
    to ``mask_prob`` of the tokens when sparse. For base at T=512: ≈ 0.60 GFLOP sparse, 0.80 dense.
    ModernBERT (``architecture="modernbert"``): a GeGLU feed-forward (6*H*F per layer) and local layers' attention
    over their window; modernbert_base at T=8192: ≈ 1.32 GFLOP sparse, of which attention is 0.62.
    """
    H, F_, L = config.hidden_size, config.intermediate_size, config.num_layers
    if config.architecture == "modernbert":
        # GeGLU: Wi is [H, 2F], Wo [F, H] (3*H*F MACs, not 2*H*F); no position table. A local layer's query sees
        # 2 * (local_attention // 2) + 1 keys, counted as computed (FlashAttention's window skips the rest; an SDPA
        # mask does not).
        n_global = len(range(0, L, config.global_attn_every_n_layers))
        keys = n_global * seq_len + (L - n_global) * min(seq_len, 2 * (config.local_attention // 2) + 1)
        encoder = 3.0 * (L * 2 * (4 * H * H + 3 * H * F_) + 4 * keys * H)
        return encoder + (mask_prob if sparse else 1.0) * mlm_head_flops(config)
    per_layer = 2 * (4 * H * H + 2 * H * F_) + 4 * seq_len * H
    return 3.0 * L * per_layer + (mask_prob if sparse else 1.0) * mlm_head_flops(config)


def mlm_head_flops(config: RobertaConfig) -> float:
    """Training FLOPs of the MLM head for one predicted position: 2*H^2 (dense) + 2*H*V (decoder), x3."""
    H, V = config.hidden_size, config.vocab_size
    return 3.0 * (2 * H * H + 2 * H * V)
