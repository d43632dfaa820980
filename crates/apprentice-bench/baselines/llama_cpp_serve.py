#!/usr/bin/env python3
"""llama.cpp (through `llama-cpp-python`) playing the episodes of `apprentice bench serve`, single
stream, on the same GGUF and the same prompt token ids.

The episodes file is JSON: `{"episodes": [[[ids of turn 1's prompt], [ids of turn 2's prompt], ...],
...], "max_tokens": 4, "stop_token_ids": [2]}`. Every turn's prompt is the whole conversation so far
(system, user, assistant, user, ...) as apprentice's tokenizer and chat template make it. Episodes
are played one after another and turns in order, one request at a time: like a serving engine with
a prefix cache, the KV cache of the previous request is kept and only the tokens after the longest
common prefix are evaluated (`Llama.eval` from `n_tokens` = the common prefix). Each request then
generates greedily up to `max_tokens` tokens, stopping after a stop token (counted, as apprentice's
usage counts it). A request's latency runs from its first evaluation to its last token.

Prints one JSON line. Needs `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python` (a source
build, about 10 minutes on 2 cores) and numpy.
"""
import argparse
import json
import math
import statistics
import sys
import time

INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF" pip install llama-cpp-python numpy'


def percentile(values, q):
    """The `q` quantile (0..1) by nearest rank, as a latency histogram reports it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", required=True, help="the GGUF file")
    parser.add_argument("--episodes", required=True, help="JSON file of the episodes' prompt token ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-turns", type=int, default=2, help="turns of the first episode played first, untimed")
    args = parser.parse_args()

    missing = []
    for module in ("llama_cpp", "numpy"):
        try:
            __import__(module)
        except ImportError:
            missing.append("llama-cpp-python" if module == "llama_cpp" else module)
    if missing:
        print(json.dumps({"error": "missing Python packages: " + ", ".join(missing), "missing": missing, "install": INSTALL}))
        return 3

    import llama_cpp
    import numpy as np

    with open(args.episodes) as f:
        spec = json.load(f)
    episodes = spec["episodes"]
    max_tokens = int(spec["max_tokens"])
    stop = set(spec.get("stop_token_ids", []))
    longest = max((len(p) for episode in episodes for p in episode), default=1)

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.gguf,
        n_ctx=longest + max_tokens + 16,
        n_batch=max(512, longest),
        n_ubatch=max(512, longest),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    n_vocab = llm.n_vocab()

    def last_logits():
        # `Llama.eval` keeps no logits unless `logits_all`; read the last position's from the context.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))

    def request(prompt):
        """One turn: evaluate what is not cached yet, then greedy tokens. Returns (seconds,
        generated tokens, prompt tokens taken from the cache)."""
        cached = list(llm.input_ids[: llm.n_tokens])
        reused = 0
        # At least the last prompt token is evaluated: its logits give the first token.
        for a, b in zip(cached, prompt[:-1]):
            if a != b:
                break
            reused += 1
        t0 = time.perf_counter()
        llm.n_tokens = reused  # `eval` drops the KV cells from here on before evaluating
        llm.eval(prompt[reused:])
        tokens = []
        while True:
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            if len(tokens) >= max_tokens or token in stop:
                break
            llm.eval([token])
        return time.perf_counter() - t0, tokens, reused

    for prompt in episodes[0][: args.warmup_turns] if episodes else []:
        request(prompt)
    llm.reset()

    latencies, generated, prompt_tokens, reused_tokens = [], 0, 0, 0
    completion_counts = []
    first_tokens = []
    wall_started = time.perf_counter()
    for episode in episodes:
        for prompt in episode:
            seconds, tokens, reused = request(prompt)
            latencies.append(seconds)
            generated += len(tokens)
            completion_counts.append(len(tokens))
            prompt_tokens += len(prompt)
            reused_tokens += reused
            if len(first_tokens) < 8:
                first_tokens.append(tokens)
    wall_s = time.perf_counter() - wall_started

    print(
        json.dumps(
            {
                "implementation": "llama.cpp",
                "version": f"llama-cpp-python {llama_cpp.__version__}",
                "threads": args.threads,
                "load_s": load_s,
                "requests": len(latencies),
                "generated_tokens": generated,
                "prompt_tokens": prompt_tokens,
                "reused_prompt_tokens": reused_tokens,
                "completion_tokens_min": min(completion_counts) if completion_counts else 0,
                "completion_tokens_max": max(completion_counts) if completion_counts else 0,
                "wall_s": wall_s,
                "generated_tokens_per_s": generated / wall_s if wall_s > 0 else None,
                "prompt_tokens_per_s": prompt_tokens / wall_s if wall_s > 0 else None,
                "requests_per_s": len(latencies) / wall_s if wall_s > 0 else None,
                "p50_ms": percentile(latencies, 0.50) * 1e3 if latencies else None,
                "p95_ms": percentile(latencies, 0.95) * 1e3 if latencies else None,
                "max_ms": max(latencies) * 1e3 if latencies else None,
                "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else None,
                "first_tokens": first_tokens,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
