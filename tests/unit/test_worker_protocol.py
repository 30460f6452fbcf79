"""The voxphone ↔ vLLM engine worker wire, and reading a worker's log for the cause of a failure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voxphone.engines.vllm_pool import VllmEngine, root_cause
from voxphone.engines.voxtral import SessionFailed, VoxtralSettings
from voxphone.engines.worker_protocol import (
    HEADER,
    MAX_PAYLOAD,
    Kind,
    decode_failure,
    decode_header,
    encode,
    encode_failure,
)


def test_a_frame_travels_as_raw_pcm_behind_a_nine_byte_header() -> None:
    frame = np.arange(1280, dtype=np.int16)
    data = encode(Kind.AUDIO, 7, frame.astype("<i2").tobytes())
    header = decode_header(data[: HEADER.size])
    assert (header.kind, header.session, header.length) == (Kind.AUDIO, 7, 2560)
    assert len(data) == 9 + 2560
    assert np.array_equal(np.frombuffer(data[HEADER.size :], "<i2"), frame)


def test_failures_keep_their_message_and_whether_to_retry() -> None:
    data = encode_failure(3, "vLLM request failed: boom", retry=False)
    header = decode_header(data[: HEADER.size])
    assert header.kind is Kind.FAIL
    assert decode_failure(data[HEADER.size :]) == ("vLLM request failed: boom", False)


@pytest.mark.parametrize(
    "bad", [HEADER.pack(99, 1, 0), HEADER.pack(Kind.AUDIO, 1, MAX_PAYLOAD + 1)]
)
def test_a_corrupt_header_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode_header(bad)


# Lines from a real vLLM 0.32 start that failed in its worker process.
VLLM_LOG = """\
(EngineCore pid=27889) INFO 11-30 11:06:40 [core.py:98] Initializing a V1 LLM engine
(VllmWorker-0 pid=28081) ERROR 11-30 11:06:45 [multiproc_executor.py:953] Traceback (most recent call last):
(VllmWorker-0 pid=28081) ERROR 11-30 11:06:45 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=28081) ERROR 11-30 11:06:45 [multiproc_executor.py:953] ValueError: Available memory on node 0 (8.01/10.34 GiB) on startup is less than desired CPU memory utilization (0.92, 9.51 GiB).
(EngineCore pid=27889) ERROR 11-30 11:06:48 [core.py:1510] Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace for root cause.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_the_root_cause_is_vllms_own_error_not_its_summaries() -> None:
    assert root_cause(VLLM_LOG.splitlines()) == (
        "ValueError: Available memory on node 0 (8.01/10.34 GiB) on startup is less than "
        "desired CPU memory utilization (0.92, 9.51 GiB)."
    )
    assert root_cause(["torch.OutOfMemoryError: CUDA out of memory."]) == (
        "torch.OutOfMemoryError: CUDA out of memory."
    )
    assert root_cause(["Killed", ""]) == "Killed"
    assert root_cause([]) == "no output"


def test_with_no_engine_left_a_session_is_refused_for_good() -> None:
    engine = VllmEngine({"model": "m"}, VoxtralSettings(), "cpu", engines=2)
    with pytest.raises(SessionFailed, match="no vLLM engine worker is running") as exc:
        asyncio.run(engine._open_session())
    assert exc.value.retry is False


def test_engines_share_the_gpu_memory_or_start_together_on_fixed_kv_bytes() -> None:
    shared = VllmEngine({"model": "m", "gpu_memory_utilization": 0.9}, VoxtralSettings(), "cuda", 3)
    assert shared.workers[0].args["gpu_memory_utilization"] == pytest.approx(0.3)
    fixed = VllmEngine(
        {"model": "m", "gpu_memory_utilization": 0.9, "kv_cache_memory_bytes": 2**33},
        VoxtralSettings(), "cuda", 8,
    )  # fmt: skip
    # vLLM only checks that this much is free at start; 8 engines starting together must pass.
    assert fixed.workers[7].args["gpu_memory_utilization"] == 0.01
