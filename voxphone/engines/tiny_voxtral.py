"""A tiny random-weight Voxtral-realtime model directory, for running vLLM's real Voxtral code on a
CPU with no downloads (``load_format="dummy"``). Used by the tests and by ``voxphone`` smoke checks.

The tokenizer is derived from the tekken file mistral_common ships (v3, no audio) by adding the
streaming special tokens at the real model's ids (``[STREAMING_PAD]`` 32, ``[STREAMING_WORD]`` 33)
and the real model's ``audio`` section; ``params.json`` keeps the real layout with tiny dims
(CPU attention needs head sizes of 32/64/80…). Its text is meaningless; its framing is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

N_SPECIAL = 100
N_VOCAB = 1000
NAMED_SPECIALS = {
    20: "[ARGS]", 21: "[CALL_ID]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]",
    32: "[STREAMING_PAD]", 33: "[STREAMING_WORD]", 34: "[TRANSCRIBE]",
}  # fmt: skip

AUDIO = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "transcription_format": "streaming",
    "transcription_delay_ms": 480,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": 32,
}


def _tekken() -> dict[str, Any]:
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    base = json.loads(src.read_text())
    specials: list[dict[str, Any]] = [
        {"rank": t["rank"], "token_str": str(t["token_str"]), "is_control": True}
        for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    taken = {s["rank"] for s in specials}
    for rank in range(N_SPECIAL):
        if rank not in taken:
            name = NAMED_SPECIALS.get(rank, f"<SPECIAL_{rank}>")
            specials.append({"rank": rank, "token_str": name, "is_control": True})
    specials.sort(key=lambda s: int(s["rank"]))
    config = {
        **base["config"],
        "version": "v11",
        "num_vocab_tokens": N_VOCAB,
        "default_vocab_size": N_VOCAB + N_SPECIAL,
        "default_num_special_tokens": N_SPECIAL,
    }
    return {
        "config": config,
        "vocab": base["vocab"][:N_VOCAB],
        "special_tokens": specials,
        "audio": AUDIO,
    }


def _params(max_model_len: int) -> dict[str, Any]:
    encoder = {
        "audio_encoding_args": {
            "sampling_rate": 16000, "frame_rate": 12.5, "num_mel_bins": 128, "hop_length": 160,
            "window_size": 400, "chunk_length_s": None, "global_log_mel_max": 1.5,
            "transcription_format": "streaming",
        },
        "dim": 128, "n_layers": 2, "head_dim": 32, "hidden_dim": 256, "n_heads": 4,
        "vocab_size": N_VOCAB + N_SPECIAL, "n_kv_heads": 4, "use_biases": True, "use_cache": False,
        "rope_theta": 1e6, "causal": True, "norm_eps": 1e-5, "pos_embed": "rope",
        "max_source_positions": None, "ffn_type": "swiglu", "norm_type": "rms_norm",
        "sliding_window": 750,
    }  # fmt: skip
    return {
        "dim": 128, "n_layers": 2, "head_dim": 32, "hidden_dim": 256, "n_heads": 4,
        "n_kv_heads": 2, "use_biases": False, "causal": True, "rope_theta": 1e6, "norm_eps": 1e-5,
        "vocab_size": N_VOCAB + N_SPECIAL, "tied_embeddings": True, "sliding_window": 8192,
        "max_position_embeddings": max_model_len, "model_max_length": max_model_len,
        "ada_rms_norm_t_cond": True, "ada_rms_norm_t_cond_dim": 8,
        "multimodal": {"whisper_model_args": {
            "encoder_args": encoder, "downsample_args": {"downsample_factor": 4},
        }},
    }  # fmt: skip


def write_tiny_voxtral(directory: Path, max_model_len: int = 4096) -> Path:
    """Write ``params.json`` and ``tekken.json`` into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tekken.json").write_text(json.dumps(_tekken()))
    (directory / "params.json").write_text(json.dumps(_params(max_model_len)))
    return directory
