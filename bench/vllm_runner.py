"""The vLLM rows of `python -m bench.load`; runs inside vLLM's own virtualenv (bench/setup_vllm.sh).

    VLLM_TARGET_DEVICE=cpu $VLLM_VENV/bin/python bench/vllm_runner.py job.json result.json

The job (JSON) names the row, the model directory, the warm-up length, optionally a `speculative_config` for
`vllm.LLM` (e.g. {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
"prompt_lookup_min": 2}) and its workloads, run in order on the one engine: per workload its name, the
prompts as token ids, max_new_tokens and per concurrency level the prompt indices each client sends in
order. N clients are emulated as a closed loop over vLLM's engine: N requests in flight, and when one
finishes its client sends its next one, so vLLM batches them continuously as its server would. Greedy,
ignore_eos, like the specd rows.

Imports only the standard library and vLLM: this virtualenv has no specd.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def run_level(engine, prompts: list[list[int]], plan: list[list[int]], params) -> dict:
    """Times one level; `plan[c]` lists the prompt indices client c sends back to back."""
    queues = [list(indices) for indices in plan]
    in_flight: dict[str, dict] = {}
    done: list[dict] = []
    serial = 0

    def send(client: int) -> None:
        nonlocal serial
        if not queues[client]:
            return
        prompt = queues[client].pop(0)
        request_id = f"c{client}-r{serial}"
        serial += 1
        in_flight[request_id] = {"client": client, "prompt": prompt, "start_s": time.perf_counter(), "ttft_s": None}
        engine.add_request(request_id, {"prompt_token_ids": prompts[prompt]}, params)

    started = time.perf_counter()
    for client in range(len(plan)):
        send(client)
    while in_flight:
        for output in engine.step():
            request = in_flight.get(output.request_id)
            if request is None:
                continue
            now = time.perf_counter()
            if request["ttft_s"] is None and output.outputs and output.outputs[0].token_ids:
                request["ttft_s"] = now - request["start_s"]
            if output.finished:
                del in_flight[output.request_id]
                request.update(token_ids=list(output.outputs[0].token_ids), latency_s=now - request["start_s"],
                               start_s=request["start_s"] - started)
                done.append(request)
                send(request["client"])
    return {"wall_s": time.perf_counter() - started, "requests": done}


def main(job_path: str, result_path: str) -> int:
    import vllm
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    speculative = {"speculative_config": job["speculative_config"]} if job.get("speculative_config") else {}
    # 2048 positions per request: 16 requests in flight fit vLLM's 2 GiB CPU KV cache many times over.
    llm = LLM(model=job["model"], dtype="float32", seed=0, max_model_len=2048, **speculative)
    engine = llm.llm_engine
    warmup = SamplingParams(temperature=0.0, max_tokens=job["warmup_tokens"], ignore_eos=True)
    workloads = []
    for workload in job["workloads"]:
        params = SamplingParams(temperature=0.0, max_tokens=workload["max_new_tokens"], ignore_eos=True)
        levels = []
        for level in workload["levels"]:
            plan = level["plan"]
            run_level(engine, workload["prompts"], [indices[:1] for indices in plan], warmup)
            result = run_level(engine, workload["prompts"], plan, params)
            levels.append({"clients": len(plan), **result})
            print(f"{job.get('name', 'vllm')} [{workload['name']}]: {len(plan)} clients, "
                  f"{len(result['requests'])} requests in {result['wall_s']:.1f}s", file=sys.stderr, flush=True)
        workloads.append({"name": workload["name"], "levels": levels})
    Path(result_path).write_text(json.dumps({"vllm_version": vllm.__version__, "workloads": workloads}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
