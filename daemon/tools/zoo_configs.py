"""Tiny configs of every mlx-lm MoE architecture (model_type -> HF-style config entry).

Merged over `zoo.BASE` by `zoo.zoo_config` (an entry with `"_no_base": True` is used as is).
Each follows the layout of its family's released checkpoints, shrunk, and exercises what makes its
MoE distinctive (the comments say what).
"""

# ---------------------------------------------------------------- part a

# Shared by the DeepSeek-style MLA configs: small latent ranks, every rank that feeds a
# quantized projection a multiple of 64, DeepSeek-V3's YaRN rope scaling.
_MLA = {
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "num_key_value_heads": 4,
}
_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

# Ling-2.0's MoE (bailing_moe, bailing_moe_linear): dense first layer, sigmoid + expert_bias,
# groups 4/2, routed scaling 2.5, 1 shared expert, qk norm, partial rotary.
_LING2_MOE = {
    "num_experts": 16,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "routed_scaling_factor": 2.5,
    "n_group": 4,
    "topk_group": 2,
    "use_qk_norm": True,
    "partial_rotary_factor": 0.5,
}

# DeepSeek-V3's MoE (deepseek_v3, deepseek_v32): sigmoid + e_score_correction_bias, noaux_tc,
# groups 4/2, routed scaling 2.5, 1 shared expert, dense first layer.
_DSV3_MOE = {
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
}

_A: dict[str, dict] = {
    # Klear-46B-A2.5B: sigmoid gate + expert_bias (selection only), 1 shared expert mixed with
    # the routed output through a learned 2-way softmax `coefficient`; dense first layer
    # through mlp_only_layers.
    "Klear": {
        "model_type": "Klear",
        "num_experts": 16,
        "n_shared_experts": 1,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "norm_topk_prob": True,
        "attention_bias": False,
    },
    # Arcee Trinity (AFMoE): 1 dense layer, router named `router` (router.gate), sigmoid +
    # expert_bias, route_scale 2.826, shared expert, gated attention, 3 sliding + 1 global
    # layer (RotatingKVCache with a window smaller than the decode), muP embedding scale.
    "afmoe": {
        "model_type": "afmoe",
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "full_attention"],
        "sliding_window": 16,
        "num_experts": 16,
        "num_shared_experts": 1,
        "num_dense_layers": 1,
        "score_func": "sigmoid",
        "route_norm": True,
        "route_scale": 2.826,
        "n_group": 1,
        "topk_group": 1,
        "mup_enabled": True,
        "rms_norm_eps": 1e-5,
    },
    # Ling-2.0 style bailing_moe (Ling-mini-2.0): first dense layer, sigmoid + expert_bias,
    # grouped routing (n_group/topk_group), routed scaling 2.5, 1 shared expert, qk norm,
    # partial rotary. Router is mlp.gate (BailingMoeGate, gate_proj inside) returning
    # (indices, scores).
    "bailing_moe": {
        "model_type": "bailing_moe",
        **_LING2_MOE,
        "use_bias": False,
        "use_qkv_bias": False,
    },
    # Ring-mini-linear-2.0: hybrid lightning (linear GLA) attention / full attention every
    # layer_group_size layers, plus Ling-2.0 MoE (dense first layer, sigmoid + expert_bias,
    # groups, shared expert).
    "bailing_moe_linear": {
        "model_type": "bailing_moe_linear",
        "num_hidden_layers": 4,
        "layer_group_size": 2,
        "group_norm_size": 4,
        **_LING2_MOE,
    },
    # Ling/Ring-2.5 hybrid: MLA (absorbed embed_q/unembed_out) every layer_group_size layers,
    # lightning linear attention elsewhere; MoE with dense first layer, sigmoid + expert_bias,
    # groups (-inf masking), shared expert of its own size.
    "bailing_hybrid": {
        "model_type": "bailing_hybrid",
        "num_hidden_layers": 4,
        "layer_group_size": 2,
        "group_norm_size": 4,
        "num_experts": 16,
        "num_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 64,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "norm_topk_prob": True,
        "use_qk_norm": True,
        "partial_rotary_factor": 0.5,
        **_MLA,
        "num_key_value_heads": 4,
    },
    # Bailing V3 (model_type bailing_hybrid + BailingMoeV3ForCausalLM, which mlx-lm remaps to
    # bailing_moe_v3, as the real checkpoints are): KDA (gated delta) linear layers with short
    # convs + gated MLA every layer_group_size layers; MoE gate is a bare weight (mlp.gate.weight)
    # with expert_bias, sigmoid, groups, routed scaling, shared expert.
    "bailing_moe_v3": {
        "model_type": "bailing_hybrid",
        "architectures": ["BailingMoeV3ForCausalLM"],
        "num_hidden_layers": 4,
        "layer_group_size": 2,
        "num_experts": 16,
        "num_shared_experts": 1,
        "moe_shared_expert_intermediate_size": 64,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "head_dim": 32,
        "short_conv_kernel_size": 4,
        "rope_interleave": True,
        "no_kda_lora": True,
        "kda_safe_gate": True,
        **_MLA,
    },
    # DeepSeekMoE 16B: softmax gate (bare weight, mlp.gate.weight), 2 shared experts, dense
    # first layer (first_k_dense_replace), MHA.
    "deepseek": {
        "model_type": "deepseek",
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_key_value_heads": 4,
    },
    # DeepSeek-V2 (236B): MLA with q_lora, YaRN, softmax gate with group_limited_greedy
    # (n_group/topk_group), routed scaling 16, 2 shared experts, dense first layer.
    "deepseek_v2": {
        "model_type": "deepseek_v2",
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "routed_scaling_factor": 16.0,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "max_position_embeddings": 163840,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        **_MLA,
    },
    # DeepSeek-V3: MLA (absorbed), sigmoid + e_score_correction_bias, noaux_tc, groups,
    # routed scaling 2.5, 1 shared expert, dense first layer, YaRN.
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        **_DSV3_MOE,
        "max_position_embeddings": 163840,
        "rope_scaling": _YARN,
        **_MLA,
    },
    # DeepSeek-V3.2: V3's MoE + the lightning indexer (sparse attention); index_topk is below
    # the decoded length so the sparse path really runs. CacheList(KVCache, KVCache) caches.
    "deepseek_v32": {
        "model_type": "deepseek_v32",
        **_DSV3_MOE,
        "index_n_heads": 4,
        "index_head_dim": 64,
        "index_topk": 8,
        "max_position_embeddings": 163840,
        "rope_scaling": _YARN,
        **_MLA,
    },
    # DeepSeek-V4.1, built through the multimodal wrapper (text_config) as its checkpoints
    # are: every layer MoE; router `mlp.gate` (bare weight, sqrtsoftplus + bias, routed
    # scaling 1.5) called on the flattened (N, D) tokens; experts nested at
    # mlp.experts.switch_mlp with the clamped SwiGLU; 1 shared expert; hyper-connections;
    # sliding window + compressed KV (ratio 2) with indexer and candidate blocks. The
    # attention's o_a_proj is a standalone SwitchLinear (grouped output projection), not an
    # expert.
    "deepseek_v41": {
        "model_type": "deepseek_v41",
        "text_config": {
            "model_type": "deepseek_v41_text",
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "head_dim": 64,
            "q_lora_rank": 64,
            "qk_rope_head_dim": 16,
            "o_groups": 2,
            "o_lora_rank": 64,
            "moe_intermediate_size": 64,
            "n_routed_experts": 16,
            "num_experts_per_tok": 4,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.5,
            "swiglu_limit": 10.0,
            "sliding_window": 8,
            "compress_ratios": [0, 2, 2],
            "kv_source_layer_ids": [1],
            "index_source_layer_ids": [1, 2],
            "candidate_source_layer_id": 1,
            "candidate_topk_blocks": 2,
            "candidate_block_size": 2,
            "index_n_heads": 4,
            "index_head_dim": 64,
            "index_topk": 4,
            "compress_rope_theta": 160000.0,
            "rope_scaling": {"type": "yarn", "factor": 16,
                             "original_max_position_embeddings": 65536,
                             "beta_fast": 32, "beta_slow": 1},
            "max_position_embeddings": 1048576,
            "hc_mult": 4,
            "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6,
        },
    },
    # dots.llm1: sigmoid + e_score_correction_bias router (mlp.gate, bare weight), noaux_tc,
    # n_group 1, routed scaling 2.5, 2 shared experts, dense first layer; experts at mlp.experts.
    "dots1": {
        "model_type": "dots1",
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
    },
    # ERNIE-4.5-21B-A3B: softmax gate (mlp.gate Linear) with renormalised top-k, 2 shared
    # experts, MoE from moe_layer_start_index 1, tied embeddings.
    "ernie4_5_moe": {
        "model_type": "ernie4_5_moe",
        "moe_num_experts": 16,
        "moe_k": 4,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 2,
        "moe_layer_interval": 1,
        "moe_num_shared_experts": 2,
        "moe_use_aux_free": True,
        "moe_gate_act": "softmax",
        "use_bias": False,
        # Untied as ERNIE-4.5-300B-A47B (the tied 21B decodes a random model into a
        # one-token loop: the input embedding dominates the tied logits).
        "tie_word_embeddings": False,
    },
    # K-EXAONE: dense first layer (is_moe_layer), sigmoid + e_score_correction_bias, routed
    # scaling 2.5, 1 shared expert, 3 sliding + 1 global attention layers (RotatingKVCache).
    "exaone_moe": {
        "model_type": "exaone_moe",
        "num_hidden_layers": 4,
        "num_experts": 16,
        "num_shared_experts": 1,
        "is_moe_layer": [False, True, True, True],
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "full_attention"],
        "sliding_window": 16,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
    # Gemma-4 26B-A4B (text only): every layer has a dense GeGLU MLP *and* a MoE in parallel;
    # the router sits on the decoder layer (layer.router: rms-norm + scale -> proj -> top-k ->
    # softmax * per_expert_scale), is fed the un-normalised residual h while the experts
    # (layer.experts.switch_glu, GeGLU) get pre_feedforward_layernorm_2(h). Sliding/global
    # layers with a wider global head, K=V on global layers, final logit softcapping.
    "gemma4_text": {
        "model_type": "gemma4_text",
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": True,
        "num_experts": 16,
        "top_k_experts": 4,
        "moe_intermediate_size": 64,
        "sliding_window": 16,
        "sliding_window_pattern": 4,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "full_attention"],
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    },
    # GLM-4.5 style: dense first layer, sigmoid + e_score_correction_bias, noaux_tc with groups,
    # routed scaling 2.5, 1 shared expert, qk norm, attention bias, partial rotary.
    "glm4_moe": {
        "model_type": "glm4_moe",
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
        "rope_scaling": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
    # GLM-4.7-Flash (glm4_moe_lite): MLA (absorbed) + V3-style MoE: dense first layer,
    # sigmoid + e_score_correction_bias, routed scaling 1.8, 1 shared expert.
    "glm4_moe_lite": {
        "model_type": "glm4_moe_lite",
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "routed_scaling_factor": 1.8,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "rms_norm_eps": 1e-5,
        **_MLA,
    },
}

# Gemma-4 as released: the multimodal wrapper with the text model in text_config, tied
# embeddings (greedy decoding of the random model repeats the last prompt token, but the
# full logprob vectors still differ step to step).
_A["gemma4"] = {
    "model_type": "gemma4",
    "text_config": _A["gemma4_text"],
}
# The flat text model untied, so that its greedy decoding does not collapse into a
# one-token loop and the routed experts change from step to step.
_A["gemma4_text"] = {**_A["gemma4_text"], "tie_word_embeddings": False}

# ---------------------------------------------------------------- part b
# Tiny configs, part b: glm_moe_dsa .. mimo_v2_flash.
#
# Every entry follows the layout of the family's released checkpoints (the keys their config.json
# carries), shrunk: hidden 128, 2-4 layers with at least 2 MoE layers, 16 experts, dimensions that
# feed quantized linears multiples of 64 where the architecture allows.
#
# Entries marked `_no_base` are written out in full, so the saved config.json holds only the keys
# the real family's config has: the wrappers (kimi_vl, kimi_k25, kimi_k3, llama4), whose text model
# lives in `text_config`, and the families whose top-k is not called `num_experts_per_tok`
# (hunyuan: `moe_topk`, kimi_linear / kimi_k3: `num_experts_per_token`, longcat_flash(_ngram):
# `moe_topk`); BASE would add a stray top-level `num_experts_per_tok` that the real ones lack.



# DeepSeek-V3-style text model (MLA with q/kv latents, sigmoid + noaux_tc router with an
# e_score_correction_bias, a shared expert, a dense first layer), as the Kimi wrappers ship it.
_KIMI_DSV3_TEXT = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "tie_word_embeddings": False,
}

_B: dict[str, dict] = {
    # GLM-5: DeepSeek-V3.2 body (MLA + lightning indexer for sparse attention), dense first
    # layer, one shared expert, sigmoid + noaux_tc router with correction bias. The released
    # model has n_group=1; here 4 groups / top-2 groups exercise grouped routing too.
    # index_topk=8 < prompt length, so the indexer's sparse path really runs.
    "glm_moe_dsa": {
        "model_type": "glm_moe_dsa",
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "routed_scaling_factor": 2.5,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "n_group": 4,
        "topk_group": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "index_head_dim": 64,
        "index_n_heads": 4,
        "index_topk": 8,
        "indexer_rope_interleave": True,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "attention_bias": False,
        "rms_norm_eps": 1e-5,
    },
    # gpt-oss: experts at `mlp.experts` (not switch_mlp), router `mlp.router` (Linear with bias,
    # 8-bit), biased SwitchGLU with SwigluOAI, softmax over the top-k logits, alternating
    # sliding (window 8, RotatingKVCache wraps while decoding) / full attention with sinks, YaRN.
    "gpt_oss": {
        "model_type": "gpt_oss",
        "num_hidden_layers": 4,
        "num_local_experts": 16,
        "num_experts_per_tok": 4,
        "intermediate_size": 64,
        "head_dim": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096,
        },
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
    },
    # Granite 3.x MoE: block at `block_sparse_moe`, router `block_sparse_moe.router` is a module
    # (GraniteMoeTopKGating wrapping `.layer`) that returns (indices, gates); mu-P multipliers;
    # tied embeddings; intermediate_size is the expert size.
    "granitemoe": {
        "model_type": "granitemoe",
        "num_hidden_layers": 3,
        "num_local_experts": 16,
        "num_experts_per_tok": 4,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.03125,
        "residual_multiplier": 0.22,
        "logits_scaling": 6.0,
        "tie_word_embeddings": True,
    },
    # Granite 4.0-H: Mamba-2 / attention hybrid (NoPE attention), every layer MoE plus an
    # always-on shared MLP next to block_sparse_moe; router returns (indices, gates).
    "granitemoehybrid": {
        "model_type": "granitemoehybrid",
        "num_hidden_layers": 4,
        "layer_types": ["mamba", "mamba", "attention", "mamba"],
        "num_local_experts": 16,
        "num_experts_per_tok": 4,
        "intermediate_size": 64,
        "shared_intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "position_embedding_type": "nope",
        "mamba_n_heads": 8,
        "mamba_d_head": 32,
        "mamba_d_state": 64,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.03125,
        "residual_multiplier": 0.22,
        "logits_scaling": 6.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    },
    # Hunyuan-Large: softmax router `mlp.gate.wg`, a shared MLP (use_mixed_mlp_moe), cross-layer
    # KV sharing (use_cla, factor 2: odd layers reuse the even layer's K/V, the decoder layer
    # takes and returns shared_kv_states), QK norm, NTK-alpha RoPE. Top-k key is `moe_topk`.
    "hunyuan": {
        "_no_base": True,
        "model_type": "hunyuan",
        "vocab_size": 1024,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attention_bias": False,
        "num_experts": 16,
        "moe_topk": 2,
        "num_shared_expert": 1,
        "use_mixed_mlp_moe": True,
        "use_qk_norm": True,
        "use_cla": True,
        "cla_share_factor": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    # Jamba: Mamba / attention hybrid (attention every 4th layer from 1), MoE every 2nd layer from
    # 1 (`feed_forward` is dense on layers 0, 2), plain Linear router `feed_forward.router`,
    # top-2 then softmax. Layer 1 = attention + MoE, layer 3 = Mamba + MoE.
    "jamba": {
        "model_type": "jamba",
        "num_hidden_layers": 4,
        "attn_layer_offset": 1,
        "attn_layer_period": 4,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "num_experts": 16,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
        "mamba_dt_rank": "auto",
        "mamba_proj_bias": False,
        "mamba_conv_bias": True,
        "tie_word_embeddings": False,
    },
    # Kimi K2.5: multimodal wrapper; the text model (DeepSeek-V3 / Kimi-K2 body, under
    # `language_model.`) in text_config: q_lora MLA with YaRN (mscale_all_dim), one shared expert,
    # dense first layer, sigmoid + noaux_tc router with correction bias.
    "kimi_k25": {
        "_no_base": True,
        "model_type": "kimi_k25",
        "text_config": {
            **_KIMI_DSV3_TEXT,
            "model_type": "kimi_k2",
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.827,
            "q_lora_rank": 64,
            "rope_theta": 50000.0,
            "rope_scaling": {
                "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            },
            "max_position_embeddings": 131072,
        },
    },
    # Kimi K3: wrapper over a Kimi-Linear-style text model: KDA linear attention (layers 1-3) and
    # NoPE MLA with q_lora + output gate (layer 4), attention-residual blocks, SiTU activation,
    # a *latent* MoE (routed experts run at routed_expert_hidden_size between a down and an up
    # projection, with a norm), a shared expert, dense first layer, sigmoid router `mlp.gate` with
    # `mlp.e_score_correction_bias` on the MoE block. Top-k key `num_experts_per_token`.
    "kimi_k3": {
        "_no_base": True,
        "model_type": "kimi_k3",
        "text_config": {
            "model_type": "kimi_k3",
            "vocab_size": 1024,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 256,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "linear_attn_config": {
                "kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2,
                "head_dim": 64, "short_conv_kernel_size": 4, "gate_lower_bound": -5.0,
            },
            "hidden_act": "situ",
            "activation_situ_beta": 2.0,
            "activation_situ_linear_beta": 8.0,
            "attn_res_block_size": 2,
            "q_lora_rank": 64,
            "kv_lora_rank": 64,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 32,
            "v_head_dim": 64,
            "mla_use_nope": True,
            "mla_use_output_gate": True,
            "num_experts": 16,
            "num_experts_per_token": 4,
            "num_shared_experts": 1,
            "moe_intermediate_size": 64,
            "moe_router_activation_func": "sigmoid",
            "moe_renormalize": True,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "use_grouped_topk": True,
            "num_expert_group": 1,
            "topk_group": 1,
            "routed_expert_hidden_size": 64,
            "latent_moe_use_norm": True,
            "tie_word_embeddings": False,
        },
    },
    # Kimi Linear (48B-A3B layout): 3 KDA linear-attention layers : 1 NoPE MLA layer (no q_lora),
    # dense first layer, one shared expert, sigmoid router `mlp.gate` with the correction bias on
    # the MoE block (`mlp.e_score_correction_bias`). Top-k key `num_experts_per_token`.
    "kimi_linear": {
        "_no_base": True,
        "model_type": "kimi_linear",
        "vocab_size": 1024,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 256,
        "head_dim": 64,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "linear_attn_config": {
            "kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 2, "head_dim": 64,
            "short_conv_kernel_size": 4,
        },
        "model_max_length": 4096,
        "max_position_embeddings": 4096,
        "num_experts": 16,
        "num_experts_per_token": 4,
        "num_shared_experts": 1,
        "moe_intermediate_size": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "mla_use_nope": True,
        "moe_router_activation_func": "sigmoid",
        "moe_renormalize": True,
        "routed_scaling_factor": 2.446,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "use_grouped_topk": True,
        "num_expert_group": 1,
        "topk_group": 1,
        "tie_word_embeddings": False,
    },
    # Kimi-VL-A3B: VL wrapper over a DeepSeek-V3 text model (`language_model.`): no q_lora
    # (q_proj), two shared experts, dense first layer, sigmoid + noaux_tc with correction bias.
    "kimi_vl": {
        "_no_base": True,
        "model_type": "kimi_vl",
        "text_config": {
            **_KIMI_DSV3_TEXT,
            "model_type": "deepseek_v3",
            "n_shared_experts": 2,
            "routed_scaling_factor": 2.446,
            "q_lora_rank": None,
            "rope_theta": 800000.0,
            "max_position_embeddings": 131072,
        },
    },
    # Laguna: dense first layer then sparse (mlp_layer_types), sigmoid router at `mlp.gate.proj`
    # with softcapped logits and e_score_correction_bias, always-on shared expert, routed scaling;
    # sliding/full layers with their own head counts and per-layer-type RoPE (YaRN + partial
    # rotary on full layers), softplus attention-output gating.
    "laguna": {
        "model_type": "laguna",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "gating": True,
        "qkv_bias": False,
        "attention_bias": False,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "num_attention_heads_per_layer": [4, 8, 4, 8],
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "moe_routed_scaling_factor": 2.5,
        "moe_router_logit_softcapping": 30.0,
        "moe_router_score_func": "sigmoid",
        "rope_parameters": {
            "full_attention": {
                "rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                "partial_rotary_factor": 0.5,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "max_position_embeddings": 32768,
    },
    # LFM2-MoE (8B-A1B layout): short-conv / attention hybrid, first layer dense
    # (num_dense_layers), sigmoid router `feed_forward.gate` with expert_bias used for selection
    # only, normalized top-k; tied embeddings always.
    "lfm2_moe": {
        "model_type": "lfm2_moe",
        "num_hidden_layers": 4,
        "layer_types": ["conv", "conv", "full_attention", "conv"],
        "num_dense_layers": 1,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 64,
        "intermediate_size": 256,
        "norm_topk_prob": True,
        "use_expert_bias": True,
        "routed_scaling_factor": 1.0,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "rope_theta": 1000000.0,
    },
    # Llama 4 (Maverick layout): wrapper, text in text_config; MoE every 2nd layer
    # (interleave_moe_layer_step 2), experts at `feed_forward.experts`, router
    # `feed_forward.router`, top-1 only (mlx-lm asserts it), sigmoid score applied to the *input*
    # of the experts, always-on shared expert; chunked attention (chunk 8 < prompt + decode) on
    # 3 of 4 layers, NoPE + temperature tuning on every 4th, llama3 RoPE.
    "llama4": {
        "_no_base": True,
        "model_type": "llama4",
        "text_config": {
            "model_type": "llama4_text",
            "vocab_size": 1024,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "interleave_moe_layer_step": 2,
            "num_local_experts": 16,
            "num_experts_per_tok": 1,
            "intermediate_size": 64,
            "intermediate_size_mlp": 256,
            "head_dim": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "attention_bias": False,
            "attention_chunk_size": 8,
            "use_qk_norm": True,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
            },
            "attn_temperature_tuning": True,
            "floor_scale": 8192,
            "attn_scale": 0.1,
            "max_position_embeddings": 65536,
            "tie_word_embeddings": False,
        },
    },
    # LongCat-Flash: every layer has two MLA attentions + two dense MLPs and one MoE shortcut
    # (`mlp`, fed from the first half), router `mlp.router` (LongcatFlashTopkRouter:
    # `.classifier` + e_score_correction_bias, softmax) returning (indices, weights) over
    # n_routed + zero experts; zero ("identity") experts are remapped to index 0 with weight 0
    # before the switch. Layer count key `num_layers`, top-k key `moe_topk`.
    "longcat_flash": {
        "_no_base": True,
        "model_type": "longcat_flash",
        "attention_method": "MLA",
        "zero_expert_type": "identity",
        "hidden_size": 128,
        "ffn_hidden_size": 256,
        "expert_ffn_hidden_size": 64,
        "n_routed_experts": 16,
        "zero_expert_num": 8,
        "moe_topk": 4,
        "num_layers": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "kv_lora_rank": 64,
        "q_lora_rank": 64,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "routed_scaling_factor": 6.0,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000000.0,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
        "attention_bias": False,
        "norm_topk_prob": False,
        "router_bias": False,
    },
    # Mellum: Qwen3-MoE-like block (softmax router `mlp.gate`, normalized top-k) on every layer,
    # sliding (window 8) / full attention with per-layer-type RoPE (YaRN on full), QK norm.
    "mellum": {
        "model_type": "mellum",
        "num_hidden_layers": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 64,
        "intermediate_size": 256,
        "norm_topk_prob": True,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {
                "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                "original_max_position_embeddings": 4096,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "max_position_embeddings": 16384,
        "tie_word_embeddings": False,
    },
    # MiMo-V2-Flash: dense first layer (moe_layer_freq list), sigmoid + noaux_tc router
    # `mlp.gate` (bare weight + e_score_correction_bias), no shared expert, no routed scaling
    # (null); hybrid full / sliding (window 8) attention with different head counts, sinks on
    # the sliding layers, q/k head dim != v head dim, partial rotary, value scale.
    "mimo_v2_flash": {
        "model_type": "mimo_v2_flash",
        "num_hidden_layers": 4,
        "hybrid_layer_pattern": [0, 1, 1, 1],
        "moe_layer_freq": [0, 1, 1, 1],
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "sliding_window_size": 8,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "n_shared_experts": None,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "routed_scaling_factor": None,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "layernorm_epsilon": 1e-5,
        "rope_theta": 5000000.0,
        "swa_rope_theta": 10000.0,
        "head_dim": 48,
        "v_head_dim": 32,
        "swa_head_dim": 48,
        "swa_v_head_dim": 32,
        "partial_rotary_factor": 0.334,
        "attention_value_scale": 0.707,
    },
}

# LongCat-Flash n-gram (Lite): the LongCat-Flash body plus n-gram hashed embeddings whose
# context lives in an extra cache entry *before* the layers' (make_cache has num_layers + 1
# entries). 3-gram, 1 split -> 2 embedders of hidden/2 = 64 (quantizable post_projs).
_B["longcat_flash_ngram"] = {
    **{k: v for k, v in _B["longcat_flash"].items() if k != "attention_method"},
    "model_type": "longcat_flash_ngram",
    "ngram_vocab_size_ratio": 78,
    "emb_neighbor_num": 3,
    "emb_split_num": 1,
}

# ---------------------------------------------------------------- part c

_C: dict[str, dict] = {
    # MiniMax-M2: every layer MoE, sigmoid router + e_score_correction_bias, renormalized
    # top-k, partial rotary (rotary_dim < head_dim), qk-norm over all heads, 8-bit router.
    "minimax": {
        "model_type": "minimax", "architectures": ["MiniMaxM2ForCausalLM"],
        "num_local_experts": 16, "intermediate_size": 64, "shared_intermediate_size": 0,
        "rotary_dim": 16, "scoring_func": "sigmoid", "use_qk_norm": True,
    },
    # MiniMax-M3 (wrapper, text in text_config): first layer dense (moe_layer_freq), sigmoid
    # + bias, routed_scaling_factor, shared expert, clamped SwigluOAI experts, gemma norms,
    # partial rotary, and block-sparse attention with an indexer on the odd layers.
    "minimax_m3_vl": {
        "model_type": "minimax_m3_vl", "architectures": ["MiniMaxM3ForConditionalGeneration"],
        "text_config": {
            "model_type": "minimax_m3", "num_hidden_layers": 4,
            "num_local_experts": 16, "intermediate_size": 64, "dense_intermediate_size": 256,
            "shared_intermediate_size": 64, "routed_scaling_factor": 2.0,
            "moe_layer_freq": [0, 1, 1, 1], "use_qk_norm": True, "use_gemma_norm": True,
            "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                "partial_rotary_factor": 0.5},
            "sparse_attention_config": {
                "sparse_num_index_heads": 2, "sparse_index_dim": 32, "sparse_block_size": 4,
                "sparse_topk_blocks": 2, "sparse_local_block": 1,
                "sparse_attention_freq": [0, 1, 0, 1],
            },
        },
    },
    # Mistral Small 4: MLA attention (q/kv LoRA, absorbed kv_b), 1 shared expert, softmax
    # routing, n_group 1, no dense layer, YaRN + llama-4 attention scaling.
    "mistral4": {
        "model_type": "mistral4", "architectures": ["Mistral4ForCausalLM"],
        "num_key_value_heads": 4, "n_routed_experts": 16, "n_shared_experts": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
        "first_k_dense_replace": 0, "q_lora_rank": 64, "kv_lora_rank": 64,
        "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64, "head_dim": None,
        "rope_parameters": {
            "rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
            "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
        "max_position_embeddings": 1048576,
    },
    # Mixtral: router `gate` (softmax over the top-k logits), experts under block_sparse_moe.
    "mixtral": {
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64,
        "rope_theta": 1000000.0,
    },
    # OLMoE: softmax over all experts, no renormalization, qk-norm over all heads; the expert
    # width is intermediate_size (there is no dense MLP).
    "olmoe": {
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"],
        "num_experts": 16, "num_experts_per_tok": 4, "intermediate_size": 64,
        "norm_topk_prob": False,
    },
    # Phi-3.5-MoE: sparsemixer routing (top-k by iterated masked softmax), LayerNorms,
    # biased attention, LongRoPE (SuScaledRoPE).
    "phimoe": {
        "model_type": "phimoe", "architectures": ["PhiMoEForCausalLM"],
        "num_local_experts": 16, "num_experts_per_tok": 2, "intermediate_size": 64,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "router_jitter_noise": 0.01,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 16,
                         "long_factor": [1.5] * 16, "short_mscale": 1.243163121016122,
                         "long_mscale": 1.243163121016122},
    },
    # Phixtral: phi-2 parallel blocks, SwitchMLP (fc1/fc2 with biases, gelu) under `moe`,
    # router `gate` with softmax over the top-k logits. Its own config keys.
    "phixtral": {
        "_no_base": True, "model_type": "phixtral", "architectures": ["PhiForCausalLM"],
        "num_vocab": 1024, "vocab_size": 1024, "model_dim": 128, "num_heads": 4,
        "num_layers": 3, "rotary_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    # Qwen1.5-MoE: softmax top-k without renormalization + sigmoid-gated shared expert.
    "qwen2_moe": {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
        "num_experts": 16, "shared_expert_intermediate_size": 256, "rope_theta": 1000000.0,
    },
    # Muse Spark (wrapper, text in text_config): latent MoE (pre_expert_proj -> experts at a
    # compressed width -> post_expert_norm -> post_expert_proj), switch module named `experts`,
    # router `gate` a bare MoEGate (weight + e_score_correction_bias, not a Linear), sigmoid
    # routing in a Metal kernel, NoPE layers (layer_rope_theta 0), sliding layers, softcapping.
    "muse_spark": {
        "model_type": "muse_spark", "architectures": ["MuseSparkForConditionalGeneration"],
        # transformers (read by the tokenizer loader) checks the audio tower's width.
        "audio_config": {"out_hidden_size": 128},
        "text_config": {
            "num_hidden_layers": 4, "post_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "layer_rope_theta": [500000.0, 500000.0, 500000.0, 0.0],
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                            "full_attention"],
            "sliding_window": 8, "final_logit_softcapping": 30.0, "output_multiplier": 1.0,
            "num_local_experts": 16, "moe_hidden_size": 64, "moe_intermediate_size": 64,
            "routed_scaling_factor": 1.0, "num_shared_experts": 0,
            "mlp_layer_types": ["sparse"] * 4,
        },
    },
    # Nemotron-3 (Nano/Super): hybrid Mamba2 / attention / MoE stack ("ME*E": the MoE blocks
    # are layers of their own), router `gate` a bare MoEGate returning (inds, scores): sigmoid +
    # e_score_correction_bias, routed_scaling_factor 2.5; ReLU^2 SwitchMLP (fc1/fc2); shared
    # expert; Super's latent projection (fc1_latent_proj / fc2_latent_proj) around the experts.
    "nemotron_h": {
        "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
        "hybrid_override_pattern": "ME*E", "attention_bias": False,
        "mamba_num_heads": 4, "mamba_head_dim": 32, "mamba_proj_bias": False,
        "ssm_state_size": 32, "conv_kernel": 4, "n_groups": 2, "mlp_bias": False,
        "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
        "moe_intermediate_size": 64, "moe_shared_expert_intermediate_size": 128,
        "moe_latent_size": 64, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
    # Qwen3-Next: 3 gated-delta-net layers + 1 full attention layer (interval 4), softmax top-k
    # renormalized, sigmoid-gated shared expert, partial rotary.
    "qwen3_next": {
        "model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"],
        "num_hidden_layers": 4, "full_attention_interval": 4,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
        "num_experts": 16, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "shared_expert_intermediate_size": 64, "norm_topk_prob": True,
        "partial_rotary_factor": 0.25, "rope_theta": 10000000.0,
    },
    # Qwen3.5 with experts (model_type qwen3_5, text in text_config, num_experts > 0): the
    # Qwen3-Next MoE block (shared expert) in every layer, gated delta net + attention.
    "qwen3_5": {
        "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": {
            "model_type": "qwen3_5_text", "num_hidden_layers": 4, "full_attention_interval": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
            "num_experts": 16, "shared_expert_intermediate_size": 64, "norm_topk_prob": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True},
        },
    },
    # Qwen3.5-MoE (e.g. Qwen3.5-35B-A3B): as qwen3_5 with experts, its own model_type.
    "qwen3_5_moe": {
        "model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": {
            "model_type": "qwen3_5_moe_text", "num_hidden_layers": 4,
            "full_attention_interval": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
            "num_experts": 16, "shared_expert_intermediate_size": 64, "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True},
        },
    },
    # PRISM Hadamard pack of a Qwen3.5 MoE (qwen3_5 classes with experts; schema 2 manifest,
    # one shared-expert down_proj per layer replaced by a 2-bit HadamardQuantizedLinear, with a
    # 512-wide Hadamard rotation in layer 0). The pack demands quantization == exactly
    # {bits 2, group 128, affine}; make_tiny's 4-bit requantization would add per-layer
    # entries to it and the load would refuse it, so every other input width (hidden 96,
    # head_dim 24, experts 96) is kept off multiples of 64: nothing else gets quantized and
    # the routed experts stay float32. The packed layers' weights stay zero (built frozen).
    "prism_hadamard_qwen35": {
        "_no_base": True, "model_type": "prism_hadamard_qwen35",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "tie_word_embeddings": False,
        "schema_version": 2, "tensor_namespace": "mlx-vlm-qwen3_5",
        "gdn_activation_layout": "grouped",
        "quantization": {"bits": 2, "group_size": 128, "mode": "affine"},
        "modules": [{"path": f"model.layers.{i}.mlp.shared_expert.down_proj", "embedding": False,
                     "dtype": "float16", "block": 512 if i == 0 else 0} for i in range(4)],
        "text_config": {
            "model_type": "qwen3_5_moe_text", "vocab_size": 1024, "hidden_size": 96,
            "num_hidden_layers": 4, "full_attention_interval": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
            "intermediate_size": 96, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
            "linear_key_head_dim": 24, "linear_value_head_dim": 24, "linear_conv_kernel_dim": 4,
            "num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 96,
            "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                "partial_rotary_factor": 0.25},
        },
    },
    # Qwen3-VL-MoE (wrapper over qwen3_moe, text in text_config).
    "qwen3_vl_moe": {
        "model_type": "qwen3_vl_moe", "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "num_experts": 16, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "norm_topk_prob": True, "rope_theta": 5000000.0,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5],
                             "mrope_interleaved": True},
        },
    },
    # Solar Open (glm4_moe classes): router `gate` a bare MoEGate (sigmoid + bias, noaux_tc)
    # returning (inds, scores), one shared expert, every layer MoE, full rotary, no qk-norm.
    "solar_open": {
        "model_type": "solar_open", "architectures": ["SolarOpenForCausalLM"],
        "n_routed_experts": 16, "n_shared_experts": 1, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 0, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
        "partial_rotary_factor": 1.0, "use_qk_norm": False, "attention_bias": False,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
    },
    # Step-3.5-Flash: first layer dense (moe_layers_enum), router `gate` a Step3p5MoEGate
    # module (its Linear is gate.gate, plus router_bias) returning (inds, weights): sigmoid +
    # bias, scaling 3.0; shared expert `share_expert`; clamped SwiGLU in one layer; sliding
    # layers with more heads (attention_other_setting), per-layer rope theta / partial rotary,
    # YaRN on full layers only, head-wise attention gate.
    "step3p5": {
        "model_type": "step3p5", "architectures": ["Step3p5ForCausalLM"],
        "num_hidden_layers": 4, "num_attention_groups": 2,
        "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                        "full_attention"],
        "sliding_window": 8,
        "attention_other_setting": {"num_attention_heads": 8, "num_attention_groups": 2},
        "rope_theta": [5000000.0, 10000.0, 10000.0, 5000000.0],
        "partial_rotary_factors": [0.5, 1.0, 1.0, 0.5],
        "yarn_only_types": ["full_attention"],
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                         "original_max_position_embeddings": 131072},
        "max_position_embeddings": 262144, "use_head_wise_attn_gate": True,
        "moe_num_experts": 16, "moe_top_k": 4, "moe_intermediate_size": 64,
        "share_expert_dim": 64, "moe_layers_enum": "1,2,3", "moe_router_scaling_factor": 3.0,
        "norm_expert_weight": True, "swiglu_limits": [0.0, 0.0, 7.0, 0.0],
        "swiglu_limits_shared": [0.0, 0.0, 16.0, 0.0],
    },
}

_QWEN3_MOE = {
    # Qwen3-30B-A3B's layout: softmax top-k, renormalised, every layer MoE.
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 16, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True},
}

CONFIGS: dict[str, dict] = {**_A, **_B, **_C, **_QWEN3_MOE}
