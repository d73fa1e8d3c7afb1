"""vLLM's own block hashes for a list of cases, computed by vLLM's code (run in its venv).

Usage: ``VLLM_PYTHON tests/vllm/vllm_reference.py < cases.json > hashes.json``. Each case is
``{"algo", "seed" (null: PYTHONHASHSEED unset), "block_size", "tokens", "cache_salt",
"lora": [name, path] | null}``; the answer for each is ``{"none_hash": hex, "digests": [hex],
"event_hashes": [int]}``: the root, every full block's digest, and what a KV event would carry.

The hashes come from a real ``vllm.v1.request.Request`` with vLLM's block hasher attached, so
extra keys (salt, LoRA) are vLLM's, not ours. The unit tests' golden values were captured with
this script; the real-vLLM tier runs it again to catch drift in a new vLLM release.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    results = []
    for index, case in enumerate(json.load(sys.stdin)):
        if case["seed"] is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = case["seed"]
        hash_fn = get_hash_fn_by_name(case["algo"])
        kv_cache_utils.init_none_hash(hash_fn)
        lora = case.get("lora")
        request = Request(
            request_id=f"case-{index}",
            prompt_token_ids=list(case["tokens"]),
            sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None,
            lora_request=LoRARequest(lora[0], index + 1, lora[1]) if lora else None,
            cache_salt=case.get("cache_salt"),
            block_hasher=kv_cache_utils.get_request_block_hasher(case["block_size"], hash_fn),
        )
        digests = [bytes(h) for h in request.block_hashes]
        results.append(
            {
                "none_hash": bytes(kv_cache_utils.NONE_HASH).hex(),
                "digests": [d.hex() for d in digests],
                "event_hashes": [kv_cache_utils.maybe_convert_block_hash(d) for d in digests],
            }
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
